// Package trust is how Tandem decides whom to talk to: mutual TLS against
// the cluster's own CA on every listener and every client, node identities
// read from certificates, the rule that plaintext listens on loopback only,
// and the files (CA, node certificates) that `tandem certs` makes.
//
// It owns: loading a node's PEM files into an Identity; the tls.Config of
// a server (TLS 1.3, a client certificate chained to the CA required) and
// of a client (the server's certificate chained to the CA, and, when the
// caller knows whom it dials, naming that node); Listen and Dial, the one
// listener and one dialer every Tandem channel uses; PeerName, the node a
// connection's verified certificate names; and issuing a CA and node
// certificates (ECDSA P-256, files 0600 in a 0700 directory).
//
// A certificate names its node in the subject's common name and as a DNS
// SAN. Peers are reached by IP address, so a client does not check the
// server's host name: it checks the chain against the CA and, when it
// expects a node, that the certificate names it. Certificates made by
// openssl work the same, provided they carry the node's name as CN or as a
// DNS SAN.
//
// It must never: fall back to plaintext when TLS flags are given, accept a
// certificate from another CA, or let a plaintext listener bind anything
// but a loopback address without the explicit Insecure switch.
package trust
