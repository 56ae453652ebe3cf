package main

import (
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/trust"
)

// defaultAPI is every command's --api default, the nodes' and the
// clients' alike: a bare "tandem status" on a node's host reaches that
// node whatever its role.
const defaultAPI = "127.0.0.1:7070"

// newAPIClient is a client of another node's API with a deadline on every
// call (timeout; 0: api.DefaultTimeout): over HTTPS with id's certificate
// (the server's must chain to the same CA), or plain HTTP when id is nil.
func newAPIClient(addr string, id *trust.Identity, timeout time.Duration) *api.Client {
	return api.NewClient(addr, id.ClientTLS(""), timeout)
}
