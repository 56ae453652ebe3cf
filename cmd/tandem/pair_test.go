package main

import (
	"strings"
	"testing"
	"time"
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
