package ft

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/replica"
)

func TestActivationRefusal(t *testing.T) {
	now := time.Now()
	cases := []struct {
		name      string
		connected bool
		heard     time.Time
		refuse    bool
	}{
		{"never heard", false, time.Time{}, false},
		{"connection ended", false, now.Add(-10 * time.Millisecond), false},
		{"heard just now", true, now.Add(-10 * time.Millisecond), true},
		{"heard just inside the timeout", true, now.Add(-1999 * time.Millisecond), true},
		{"silent for the timeout", true, now.Add(-2 * time.Second), false},
		{"connected, nothing heard yet", true, time.Time{}, false},
	}
	for _, c := range cases {
		why := activationRefusal("10.0.0.1:7000", c.connected, c.heard, now, 2*time.Second)
		if (why != "") != c.refuse {
			t.Errorf("%s: refusal %q, want refuse=%v", c.name, why, c.refuse)
		}
		if why != "" && (!strings.Contains(why, "10.0.0.1:7000") || !strings.Contains(why, "ago") || strings.Contains(why, "\n")) {
			t.Errorf("%s: refusal %q should be one line naming the primary and when it was heard", c.name, why)
		}
	}
}

func TestSourceVerdict(t *testing.T) {
	var body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	}))
	defer srv.Close()
	h := replica.Hello{MigrationID: "m1", SourceAPI: strings.TrimPrefix(srv.URL, "http://")}
	cases := []struct {
		body, want string
	}{
		{`{"status":"device","migration_id":"m1","commit_sent":true}`, verdictCommitted},
		{`{"status":"unknown","migration_id":"m1"}`, verdictCommitted},
		{`{"status":"completed","migration_id":"m1"}`, verdictCommitted},
		{`{"status":"failed","migration_id":"m1"}`, verdictAborted},
		{`{"status":"device","migration_id":"m1"}`, verdictUnknown},
		{`{"status":"completed","migration_id":"other"}`, verdictUnknown},
		{`{"status":"running"}`, verdictUnknown},
	}
	for _, c := range cases {
		body = c.body
		if got, detail := sourceVerdict(context.Background(), api.NewClient(h.SourceAPI, nil, 2*time.Second), h); got != c.want {
			t.Errorf("%s: verdict %s (%s), want %s", c.body, got, detail, c.want)
		}
	}
	if got, _ := sourceVerdict(context.Background(), api.NewClient("127.0.0.1:1", nil, 2*time.Second), replica.Hello{MigrationID: "m1", SourceAPI: "127.0.0.1:1"}); got != verdictUnknown {
		t.Errorf("unreachable source: %s", got)
	}
	if got, _ := sourceVerdict(context.Background(), nil, replica.Hello{}); got != verdictUnknown {
		t.Errorf("no source API: %s", got)
	}
}
