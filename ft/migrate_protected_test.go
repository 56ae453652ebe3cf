package ft

import (
	"strings"
	"testing"
)

// TestProtectedRefusal: which protected guests may move, and the one line
// each refusal says.
func TestProtectedRefusal(t *testing.T) {
	pc := migrateRequest{To: "10.0.0.2:7000", Postcopy: true}
	for _, c := range []struct {
		name                   string
		pairPrimary, clustered bool
		req                    migrateRequest
		disk, want             string
	}{
		{"pair primary, post-copy", true, false, pc, "", ""},
		{"cluster member", false, true, pc, "", "raft or etcd cluster"},
		{"secondary", false, false, pc, "", "secondary, not its primary"},
		{"precopy only", true, false, migrateRequest{To: pc.To}, "", "migrate it with --postcopy"},
		{"disk", true, false, pc, "/var/lib/g.img", "has a disk (/var/lib/g.img)"},
	} {
		err := protectedRefusal(c.pairPrimary, c.clustered, c.req, c.disk)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: refused: %v", c.name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n")):
			t.Errorf("%s: %v, want one line saying %q", c.name, err, c.want)
		}
	}
}
