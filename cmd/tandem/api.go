package main

import (
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/trust"
)

// newAPIClient is a client of another node's API with a deadline on every
// call (timeout; 0: api.DefaultTimeout): over HTTPS with id's certificate
// (the server's must chain to the same CA), or plain HTTP when id is nil.
func newAPIClient(addr string, id *trust.Identity, timeout time.Duration) *api.Client {
	return api.NewClient(addr, id.ClientTLS(""), timeout)
}
