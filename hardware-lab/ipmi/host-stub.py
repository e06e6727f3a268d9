#!/usr/bin/env python3
"""Reference implementation of the host ("VM") side of ipmi_sim's `serial 15 ... codec VM` port,
for tests: what the lab's per-server host connector does. Usage:

  host-stub.py PORT CAPS STEP...     CAPS: 0x01 power, 0x02 reset, 0x04 irq, 0x08 nmi, 0x10 attn
  STEP: send:NETFN:CMD[:HEXDATA]     an in-band IPMI request (e.g. send:0x06:0x22 pets the watchdog)
        sleep:SECONDS                wait, logging what the BMC sends (responses, POWEROFF, RESET...)

Wire format (both ways): bytes; 0xA0 ends a message, 0xA1 ends a command, 0xAA escapes the next
byte (sent as byte|0x10 for 0xA0/0xA1/0xAA). Message: seq, netfn<<2|lun, cmd, data..., checksum
(two's complement of the sum of the preceding bytes); a response is seq, netfn<<2|lun, cmd, cc,
data..., checksum. Command: one code byte and arguments. The BMC sends VERSION (ff 01) and NOATTN
on connect; the host answers CAPABILITIES (08 caps).
"""
import socket, sys, time

MSG, CMD, ESC = 0xA0, 0xA1, 0xAA
NAMES = {0x00: "NOATTN", 0x01: "ATTN", 0x02: "ATTN_IRQ", 0x03: "POWEROFF", 0x04: "RESET",
         0x05: "ENABLE_IRQ", 0x06: "DISABLE_IRQ", 0x07: "SEND_NMI", 0x08: "CAPABILITIES",
         0x09: "FORCEOFF", 0xFF: "VERSION"}


def esc(bs):
    out = bytearray()
    for b in bs:
        out += bytes([ESC, b | 0x10]) if b in (MSG, CMD, ESC) else bytes([b])
    return bytes(out)


def main():
    t0 = time.time()

    def log(*a):
        print(f"[{time.time() - t0:6.2f}s]", *a, flush=True)

    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    caps = int(sys.argv[2], 0)
    s.sendall(esc([0x08, caps]) + bytes([CMD]))
    log(f"sent CAPABILITIES 0x{caps:02x}")
    state = {"buf": bytearray(), "esc": False, "seq": 0}

    def drain(until):
        while True:
            left = until - time.time()
            if left <= 0:
                return
            s.settimeout(left)
            try:
                data = s.recv(4096)
            except socket.timeout:
                return
            if not data:
                log("EOF")
                sys.exit(0)
            for b in data:
                if b in (MSG, CMD):
                    f = bytes(state["buf"])
                    state["buf"], state["esc"] = bytearray(), False
                    if not f:
                        continue
                    if b == CMD:
                        log("BMC command:", NAMES.get(f[0], hex(f[0])), f[1:].hex())
                    else:
                        log(f"response: netfn=0x{f[1] >> 2:02x} cmd=0x{f[2]:02x} cc=0x{f[3]:02x}"
                            f" data={f[4:-1].hex()}")
                elif b == ESC:
                    state["esc"] = True
                else:
                    if state["esc"]:
                        b &= ~0x10
                        state["esc"] = False
                    state["buf"].append(b)

    for step in sys.argv[3:]:
        kind, *rest = step.split(":")
        if kind == "sleep":
            drain(time.time() + float(rest[0]))
        elif kind == "send":
            netfn, cmd = int(rest[0], 0), int(rest[1], 0)
            data = bytes.fromhex(rest[2]) if len(rest) > 2 else b""
            state["seq"] = (state["seq"] + 1) & 0xFF
            body = bytes([state["seq"], netfn << 2, cmd]) + data
            s.sendall(esc(body + bytes([(-sum(body)) & 0xFF])) + bytes([MSG]))
            log(f"sent netfn=0x{netfn:02x} cmd=0x{cmd:02x} data={data.hex()}")
            drain(time.time() + 0.2)
        else:
            sys.exit(f"unknown step {step}")


if __name__ == "__main__":
    main()
