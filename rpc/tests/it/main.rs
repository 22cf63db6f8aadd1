//! `ktd-rpc`'s integration tests: the server limits on a real tonic server over TCP.

mod limits;
