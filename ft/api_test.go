package ft

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/api"
)

// TestAPIErrorCode: a refusal's code crosses the wire and the client
// turns it back into its sentinel.
func TestAPIErrorCode(t *testing.T) {
	n := &Node{}
	srv := httptest.NewServer(http.HandlerFunc(n.handleProtect))
	defer srv.Close()
	c := api.NewClient(strings.TrimPrefix(srv.URL, "http://"), nil, 0)
	_, err := c.Protect(context.Background(), "127.0.0.1:1", "")
	if !errors.Is(err, api.ErrNotPrimary) || err.Error() != "not a primary" {
		t.Fatalf("protect on a node with no epoch loop: %v", err)
	}
}
