package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestNewFormatAndLevel(t *testing.T) {
	var b bytes.Buffer
	log, err := New(&b, Options{Format: "json", Level: "warn"})
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hidden")
	log.Warn("shown", "k", 1)
	var m map[string]any
	if err := json.Unmarshal(b.Bytes(), &m); err != nil || m["msg"] != "shown" || m["level"] != "WARN" {
		t.Fatalf("json line %q: %v", b.String(), err)
	}
	b.Reset()
	log, _ = New(&b, Options{})
	log.Debug("hidden")
	log.Info("shown")
	if !strings.Contains(b.String(), "msg=shown") || strings.Contains(b.String(), "hidden") {
		t.Fatalf("text: %q", b.String())
	}
	for _, o := range []Options{{Format: "xml"}, {Level: "loud"}} {
		if _, err := New(&b, o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}
