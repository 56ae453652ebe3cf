package kvproto

import (
	"errors"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	good := []struct {
		line string
		want Request
	}{
		{"c1:1 SET k v", Request{"c1", 1, OpSet, "k", "v"}},
		{"a-b_C:18446744073709551615 GET key.with-dots_", Request{"a-b_C", 18446744073709551615, OpGet, "key.with-dots_", ""}},
		{"x:0 DEL k\r", Request{"x", 0, OpDel, "k", ""}},
		{"x:7 SET k " + strings.Repeat("~", 256), Request{"x", 7, OpSet, "k", strings.Repeat("~", 256)}},
	}
	for _, g := range good {
		got, err := Parse([]byte(g.line))
		if err != nil || got != g.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", g.line, got, err, g.want)
		}
		if g.want.Op != OpGet || g.want.Value == "" {
			if back, _ := Parse(Format(got)); back != got {
				t.Errorf("Format round trip of %q: %+v", g.line, back)
			}
		}
	}
	bad := []struct {
		line  string
		hasID bool
	}{
		{"", false}, {"SET k v", false}, {":1 GET k", false}, {"c:x GET k", false},
		{"c:+1 GET k", false}, {"c:1", true}, {"c:1 PUT k", true}, {"c:1 get k", true},
		{"c:1 GET", true}, {"c:1 GET k extra", true}, {"c:1 SET k", true},
		{"c:1 SET k  v", true}, {"c:1 SET k v w", true}, {"c:1 GET k/", true},
		{"c:1 SET " + strings.Repeat("k", 65) + " v", true},
		{"c:1 SET k " + strings.Repeat("v", 257), true},
		{"c:1 SET k caf\xc3\xa9", true}, {"c:1 SET k a\tb", true},
		{strings.Repeat("c", 33) + ":1 GET k", false},
		{"c:99999999999999999999 GET k", false},
		{strings.Repeat("x", MaxLine+1), false},
	}
	for _, b := range bad {
		_, err := Parse([]byte(b.line))
		var pe *ParseError
		if !errors.As(err, &pe) {
			t.Errorf("Parse(%q): err %v, want ParseError", b.line, err)
			continue
		}
		if pe.HasID != b.hasID {
			t.Errorf("Parse(%q): HasID %v, want %v", b.line, pe.HasID, b.hasID)
		}
		if r := pe.Reply(); b.hasID != strings.HasPrefix(string(r), "c:1 ERR ") || strings.ContainsAny(string(r), "\n") {
			t.Errorf("Parse(%q): reply %q", b.line, r)
		}
	}
}

func TestReplies(t *testing.T) {
	cases := map[string]Reply{
		string(OKReply("c", 3, nil)):           {true, "c", 3, "OK", ""},
		string(OKReply("c", 3, []byte("v1"))):  {true, "c", 3, "OK", "v1"},
		string(NotFoundReply("c", 4)):          {true, "c", 4, "NOTFOUND", ""},
		string(ErrReply("c", 5, "bad key: x")): {true, "c", 5, "ERR", "bad key: x"},
		"ERR empty request":                    {false, "", 0, "ERR", "empty request"},
	}
	for line, want := range cases {
		got, err := ParseReply([]byte(line))
		if err != nil || got != want {
			t.Errorf("ParseReply(%q) = %+v, %v; want %+v", line, got, err, want)
		}
	}
	for _, bad := range []string{"", "OK", "c:1 MAYBE", "c:x OK"} {
		if _, err := ParseReply([]byte(bad)); err == nil {
			t.Errorf("ParseReply(%q) accepted", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"c:1 SET k v", "c:2 GET k", "c:3 DEL k", "c:1 SET k  v", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := Parse(line)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) || len(pe.Reply()) > MaxReply+200 {
				t.Fatalf("bad error %v", err)
			}
			return
		}
		back, err := Parse(Format(req))
		if err != nil || back != req {
			t.Fatalf("round trip of %q: %+v, %v", line, back, err)
		}
	})
}
