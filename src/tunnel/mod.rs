//! The tunnel a client really uses: a pod-agent runs an SSH server on a switch pod; a
//! machine-agent on a test machine connects out to it and asks for the remote forward of its
//! meeting point's port, so `ssh -p <port> <user>@<pod>` reaches the machine's own sshd. The
//! control plane decides who may forward what (the meeting point names the pod, the port and the
//! machine's key); the agents only carry bytes.

pub mod keys;
pub mod machine_agent;
pub mod pod_agent;
pub mod pod_server;
