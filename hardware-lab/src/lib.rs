//! vigil lab
