"""Two Redfish clients we did not write, against one lab BMC: the DMTF `redfish` library and the
OpenStack `sushy` library (what Ironic drives real BMCs with). Each logs in with a session over
HTTPS verified against the lab CA, reads the system, powers it off with ForceOff, waits until it
reads Off, powers it on, and logs out. Prints one JSON line per client; exits non-zero on any
failure. Usage: redfish_clients.py URL USER PASSWORD_FILE CA_FILE
"""
import json
import sys
import time

import redfish
import sushy

url, user, password_file, ca = sys.argv[1:5]
password = open(password_file).read().strip()


def wait(read, want, what, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = read()
        if last == want:
            return
        time.sleep(0.1)
    raise SystemExit(f"{what}: still {last!r} after {timeout} s, wanted {want!r}")


def dmtf():
    c = redfish.redfish_client(base_url=url, username=user, password=password, cafile=ca, timeout=10)
    c.login(auth="session")
    try:
        systems = c.get("/redfish/v1/Systems")
        assert systems.status == 200, systems.status
        uri = systems.dict["Members"][0]["@odata.id"]
        system = c.get(uri).dict
        target = system["Actions"]["#ComputerSystem.Reset"]["target"]

        def power():
            return c.get(uri).dict.get("PowerState")

        def reset(kind):
            # Firmware refuses some resets for a moment (iDRAC 409 on an On right after an Off,
            # Supermicro 400 during POST): a real client tries again, so does this one.
            deadline = time.time() + 20
            while True:
                r = c.post(target, body={"ResetType": kind})
                if r.status in (200, 202, 204) or time.time() > deadline:
                    break
                time.sleep(0.5)
            assert r.status in (200, 202, 204), (kind, r.status, r.text)

        reset("ForceOff")
        wait(power, "Off", "dmtf redfish ForceOff")
        reset("On")
        wait(power, "On", "dmtf redfish On")
        return {"client": "redfish", "system": uri, "model": system.get("Model"), "power": power()}
    finally:
        c.logout()


def openstack():
    auth = sushy.auth.SessionAuth(username=user, password=password)
    root = sushy.Sushy(url + "/redfish/v1", verify=ca, auth=auth)
    try:
        members = root.get_system_collection().get_members()
        s = members[0]
        model = s.model
        allowed = sorted(str(a) for a in s.get_allowed_reset_system_values())
        def power():
            s.refresh(force=True)
            return s.power_state

        def reset(kind):
            deadline = time.time() + 20
            while True:
                try:
                    s.reset_system(kind)
                    return
                except sushy.exceptions.HTTPError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)

        reset(sushy.ResetType.FORCE_OFF)
        wait(power, sushy.PowerState.OFF, "sushy ForceOff")
        reset(sushy.ResetType.ON)
        wait(power, sushy.PowerState.ON, "sushy On")
        return {"client": "sushy", "system": s.path, "model": model,
                "reset_types": allowed, "power": str(power())}
    finally:
        # Deletes the session (sushy's SessionAuth logs out on close).
        auth.close()


for f in (dmtf, openstack):
    print(json.dumps(f()), flush=True)
