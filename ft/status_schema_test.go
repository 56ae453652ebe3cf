package ft

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest/synth"
)

var updateSchema = flag.Bool("update-schema", false, "rewrite testdata/status_schema.txt from what each role sends")

// keyPaths lists every key path of a JSON value: an object's keys as
// PATH.KEY, an array's elements as PATH[] (their keys merged); a null or
// a scalar ends a path.
func keyPaths(prefix string, v any, out map[string]bool) {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			p := k
			if prefix != "" {
				p = prefix + "." + k
			}
			out[p] = true
			keyPaths(p, e, out)
		}
	case []any:
		for _, e := range x {
			keyPaths(prefix+"[]", e, out)
		}
	}
}

// statusPaths is the key paths of st as GET /status sends it; it fails
// unless its top-level keys are api.StatusKeys (every key on every role).
func statusPaths(t *testing.T, role string, st api.Status) []string {
	t.Helper()
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	top := make([]string, 0, len(v))
	for k := range v {
		top = append(top, k)
	}
	slices.Sort(top)
	if !slices.Equal(top, api.StatusKeys()) {
		t.Errorf("%s: top-level keys differ from api.StatusKeys (a key missing or extra):\n got %q\nwant %q", role, top, api.StatusKeys())
	}
	paths := map[string]bool{}
	keyPaths("", v, paths)
	out := make([]string, 0, len(paths))
	for p := range paths {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// TestStatusSchema pins GET /status on every role, from the nodes
// themselves: a raft trio's primary, secondary, witness and a fenced
// member; a pair's primary and secondary; a plain guest node (tandem
// run) and a migration receiver waiting for its guest. For each, the set
// of JSON key paths must equal the list in testdata/status_schema.txt,
// so a field added, renamed or dropped is a visible diff there (and in
// docs/OPERATIONS.md, which documents each). -update-schema rewrites the
// file.
func TestStatusSchema(t *testing.T) {
	got := map[string][]string{}
	wit, ma, na, ca, _, nb, _ := startTrioWitness(t)
	got["raft-primary"] = statusPaths(t, "raft-primary", na.status(false))
	eventually(t, "b holds a consistent image", func() bool {
		ss := nb.status(false).Secondary
		return ss != nil && ss.Consistent
	})
	got["raft-secondary"] = statusPaths(t, "raft-secondary", nb.status(false))
	got["witness"] = statusPaths(t, "witness", witnessStatus(wit))
	// a fenced (its lease, say): no epoch loop any more, protection
	// "fenced", the cluster still recording it as primary.
	ma.fence("test: the lease was lost")
	fenced := na.status(false)
	if fenced.State != "fenced" || fenced.Protection != "fenced" || fenced.Cluster == nil || ca.State().Primary != "a" {
		t.Fatalf("fenced: state %q protection %q cluster %+v", fenced.State, fenced.Protection, fenced.Cluster)
	}
	got["raft-fenced"] = statusPaths(t, "raft-fenced", fenced)

	_, np, _, ns := protectedPair(t)
	got["pair-primary"] = statusPaths(t, "pair-primary", np.status(false))
	got["pair-secondary"] = statusPaths(t, "pair-secondary", ns.status(false))

	run := testNode(t, "run")
	g, err := synth.New(testGuestConfig)
	if err != nil {
		t.Fatal(err)
	}
	run.Attach(g, testGuestConfig)
	run.SetState("running")
	got["run"] = statusPaths(t, "run", run.status(false))
	got["receive-waiting"] = statusPaths(t, "receive-waiting", testNode(t, "receive").status(false))

	// The file: the top-level keys once (every role has them all), then
	// each role's paths below the top level.
	var b strings.Builder
	b.WriteString("# GET /status key paths (ft TestStatusSchema; -update-schema rewrites it).\n")
	b.WriteString("# [every role]: the top-level keys, each present on every role (null where it does\n")
	b.WriteString("# not apply); [ROLE]: that role's paths below them. PATH.KEY is an object's key,\n")
	b.WriteString("# PATH[] an array's elements; a null ends a path.\n")
	roles := make([]string, 0, len(got))
	for r := range got {
		roles = append(roles, r)
	}
	slices.Sort(roles)
	fmt.Fprintf(&b, "\n[every role]\n%s\n", strings.Join(api.StatusKeys(), "\n"))
	for _, r := range roles {
		fmt.Fprintf(&b, "\n[%s]\n%s\n", r, strings.Join(nested(got[r]), "\n"))
	}
	const file = "testdata/status_schema.txt"
	if *updateSchema {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (run with -update-schema to write it)", err)
	}
	golden := parseSchema(string(want))
	for r := range golden {
		if r != everyRole {
			golden[r] = append(golden[r], golden[everyRole]...)
			slices.Sort(golden[r])
		}
	}
	for _, r := range roles {
		if !reflect.DeepEqual(got[r], golden[r]) {
			t.Errorf("%s: status key paths differ from %s (a JSON name is a contract: update the file and docs/OPERATIONS.md together)\n%s",
				r, file, pathDiff(golden[r], got[r]))
		}
	}
	for r := range golden {
		if got[r] == nil && r != everyRole {
			t.Errorf("%s: in %s but not tested", r, file)
		}
	}
}

const everyRole = "every role"

// nested is the paths below the top level.
func nested(paths []string) []string {
	var out []string
	for _, p := range paths {
		if strings.ContainsAny(p, ".[") {
			out = append(out, p)
		}
	}
	return out
}

func parseSchema(s string) map[string][]string {
	out := map[string][]string{}
	role := ""
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			role = l[1 : len(l)-1]
		default:
			out[role] = append(out[role], l)
		}
	}
	return out
}

func pathDiff(want, got []string) string {
	var b strings.Builder
	for _, p := range got {
		if !slices.Contains(want, p) {
			fmt.Fprintf(&b, "  + %s\n", p)
		}
	}
	for _, p := range want {
		if !slices.Contains(got, p) {
			fmt.Fprintf(&b, "  - %s\n", p)
		}
	}
	return b.String()
}
