package progress

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/precopy"
)

// Follow keeps following while post-copy moves the pages, however long
// that takes past its patience (which bounds precopy, whose --max-time it
// follows): the command reports the migration's end, not a give-up.
func TestFollowWaitsOutPostcopy(t *testing.T) {
	start := time.Now()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var st api.Status
		st.Status, st.PostcopyActive = precopy.StatusDevice, true
		if time.Since(start) > time.Second {
			st.Status, st.PostcopyActive = precopy.StatusCompleted, false
		}
		json.NewEncoder(w).Encode(st)
	}))
	defer srv.Close()
	c := api.NewClientHTTP(srv.URL, srv.Client())
	err := Follow(context.Background(), c, Watch{Out: io.Discard, Patience: 300 * time.Millisecond, Limit: time.Second})
	if err != nil && strings.Contains(err.Error(), "gave up") {
		t.Fatalf("Follow gave up during post-copy: %v", err)
	}
	if time.Since(start) < time.Second {
		t.Fatalf("Follow returned after %v, before the migration ended (%v)", time.Since(start), err)
	}
}
