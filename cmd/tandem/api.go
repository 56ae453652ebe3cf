package main

import (
	"crypto/tls"
	"net/http"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/trust"
)

// newAPIClient is a client of another node's API with a deadline on every
// call (timeout; 0: api.DefaultTimeout): over HTTPS with id's certificate
// (the server's must chain to the same CA), or plain HTTP when id is nil.
func newAPIClient(addr string, id *trust.Identity, timeout time.Duration) *api.Client {
	return api.NewClient(addr, clientTLS(id, ""), timeout)
}

// apiHTTP is an HTTP client of nodes' APIs with a deadline on every call:
// https with id's certificate, or plain http when id is nil.
func apiHTTP(id *trust.Identity, timeout time.Duration) (scheme string, c *http.Client) {
	return api.NewHTTPClient(clientTLS(id, ""), timeout)
}

func clientTLS(id *trust.Identity, expect string) *tls.Config {
	if id == nil {
		return nil
	}
	return id.ClientTLS(expect)
}
