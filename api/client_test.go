package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestClientErrorsSurviveTheWire(t *testing.T) {
	mux := http.NewServeMux()
	reply := func(status int, body any) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			json.NewEncoder(w).Encode(body)
		}
	}
	mux.HandleFunc("POST /switchover", reply(409, ErrorBody{Error: "not the primary: ask the primary", Code: CodeNotPrimary}))
	mux.HandleFunc("POST /activate", reply(409, ErrorBody{Error: "the primary was heard 1s ago", Code: CodeRefused}))
	mux.HandleFunc("POST /migrate", reply(409, ErrorBody{Error: "a migration is already running", Code: CodeBusy}))
	mux.HandleFunc("POST /protect", reply(409, map[string]string{"error": "from an older node"}))
	mux.HandleFunc("POST /quit", reply(200, map[string]bool{"ok": true}))
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("digest") == "" {
			reply(500, ErrorBody{Error: "wanted a digest", Code: CodeInternal})(w, r)
			return
		}
		w.Write([]byte(`{"role":"secondary","state":"standby","build":"b","protected":true,"consistent":true,"last_committed_epoch":5,"committed_digest":"ab","unknown_future_field":1}`))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c := NewClient(strings.TrimPrefix(srv.URL, "http://"), nil, time.Second)
	ctx := context.Background()

	_, err := c.Switchover(ctx)
	if !errors.Is(err, ErrNotPrimary) || errors.Is(err, ErrRefused) || err.Error() != "not the primary: ask the primary" {
		t.Fatalf("switchover: %v", err)
	}
	var ae *Error
	if !errors.As(err, &ae) || ae.HTTPStatus != 409 || ae.Code != CodeNotPrimary {
		t.Fatalf("switchover: %#v", err)
	}
	if _, err := c.Activate(ctx, true); !errors.Is(err, ErrRefused) {
		t.Fatalf("activate: %v", err)
	}
	if err := c.Migrate(ctx, MigrateRequest{To: "x:1"}); !errors.Is(err, ErrBusy) {
		t.Fatalf("migrate: %v", err)
	}
	if _, err := c.Protect(ctx, "x:1", ""); !errors.Is(err, ErrRefused) || err.Error() != "from an older node" {
		t.Fatalf("protect (no code: by the HTTP status): %v", err)
	}
	if _, err := c.Status(ctx, false); !errors.Is(err, ErrInternal) {
		t.Fatalf("status: %v", err)
	}
	st, err := c.Status(ctx, true)
	if err != nil || st.Secondary == nil || st.Secondary.Digest != "ab" || st.LastCommittedEpoch() != 5 || !st.Protected() || st.Epochs != nil {
		t.Fatalf("status: %+v %v", st, err)
	}
	if err := c.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := c.Quit(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}
