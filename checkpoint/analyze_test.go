package checkpoint

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestAnalyze(t *testing.T) {
	stream, _ := writeStream(t, Options{}, 4, 3)
	rep, err := Analyze(bytes.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Complete || rep.Error != "" || len(rep.Epochs) != 4 || rep.Totals.WireBytes != int64(len(stream)) {
		t.Fatalf("complete %v error %q epochs %d wire %d of %d", rep.Complete, rep.Error, len(rep.Epochs), rep.Totals.WireBytes, len(stream))
	}
	p := rep.Totals.Pages
	if p.Total() != 4*300 || p.Zero == 0 || p.XOR == 0 || p.Stored == 0 || p.Raw == 0 {
		t.Fatalf("pages by encoding %+v: every encoding should appear", p)
	}
	var text bytes.Buffer
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"format version 1", "EPOCH-END", "epoch 4:", "complete"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, text.String())
		}
	}
	js, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"wire_size"`, `"raw_size"`, `"zero_pages"`, `"by_type"`, `"guest_kind"`, `"digests_verified"`} {
		if !bytes.Contains(js, []byte(key)) {
			t.Errorf("JSON lacks %s", key)
		}
	}
}

// A broken stream still yields everything before the damage.
func TestAnalyzeBroken(t *testing.T) {
	stream, _ := writeStream(t, Options{}, 4, 3)
	full, _ := Analyze(bytes.NewReader(stream))
	cut := full.Epochs[2].Offset + 5
	rep, err := Analyze(bytes.NewReader(stream[:cut]))
	if !errors.Is(err, ErrTruncated) {
		t.Fatalf("err %v, want ErrTruncated", err)
	}
	if rep.Complete || len(rep.Epochs) != 2 || rep.Error == "" || rep.ErrorOffset != full.Epochs[2].Offset {
		t.Fatalf("complete %v epochs %d error %q at %d", rep.Complete, len(rep.Epochs), rep.Error, rep.ErrorOffset)
	}
	var text bytes.Buffer
	rep.WriteText(&text)
	if !strings.Contains(text.String(), "BROKEN at offset") {
		t.Fatalf("text report hides the error:\n%s", text.String())
	}
}
