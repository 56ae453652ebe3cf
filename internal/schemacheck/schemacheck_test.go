package schemacheck

import (
	"maps"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/replica"
)

func TestCheckSchemas(t *testing.T) {
	cur := Current()
	if p, _ := Check(cur, cur); len(p) != 0 {
		t.Fatalf("a build is incompatible with itself: %v", p)
	}
	clone := func() Dump {
		d := cur
		d.Devices = map[string]map[string]uint32{}
		for k, v := range cur.Devices {
			m := map[string]uint32{}
			for n, ver := range v {
				m[n] = ver
			}
			d.Devices[k] = m
		}
		return d
	}
	bumped := clone()
	bumped.Devices["kvm"]["kvm-vcpu"]++
	gone := clone()
	delete(gone.Devices["synth"], "synth-console")
	added := clone()
	added.Devices["synth"]["synth-extra"] = 1
	newer := clone()
	newer.Format.MinReadable, newer.Format.MinWritable, newer.Format.Current = 2, 2, 2
	for _, tc := range []struct {
		name string
		nw   Dump
		want string
	}{
		{"version bump", bumped, `"kvm-vcpu" changed version`},
		{"device removed", gone, `"synth-console" (version 1) is unknown`},
		{"device added", added, `"synth-extra" (version 1) is new`},
		{"format moved on", newer, "older than the oldest the new one reads"},
	} {
		p, _ := Check(cur, tc.nw)
		if !strings.Contains(strings.Join(p, "\n"), tc.want) {
			t.Errorf("%s: problems %v, want one saying %q", tc.name, p, tc.want)
		}
	}
}

// The dump of the build before the first new device section (synth-nic,
// issue 14), kept in testdata: `tandem schema dump` of commit 635aff1.
const beforeCardDump = "testdata/schema-before-nic.json"

// The first change to the device-state schema passes the check: the
// card's section is new and optional, so streams of the build before it
// load in this one (their guests have no card), and the note says what
// a guest with a card needs. Were the section saved by every guest, it
// would be a problem.
func TestCheckAgainstBuildBeforeCard(t *testing.T) {
	old, err := Read(beforeCardDump)
	if err != nil {
		t.Fatal(err)
	}
	cur := Current()
	problems, notes := Check(old, cur)
	if len(problems) != 0 {
		t.Fatalf("this build is incompatible with the one before the card: %v", problems)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], `synth device "synth-nic" (version 1) is new and optional`) {
		t.Fatalf("notes %q, want one on synth-nic", notes)
	}
	required := cur
	required.Optional = nil
	if p, _ := Check(old, required); len(p) != 1 || !strings.Contains(p[0], `"synth-nic" (version 1) is new and saved by every guest`) {
		t.Fatalf("with synth-nic not optional: problems %q, want one on it", p)
	}
}

// The sections a sender assumes every receiver before section checks
// loads (replica's legacy set) are exactly the old build's devices.
func TestLegacySectionsAreTheBuildBeforeCard(t *testing.T) {
	old, err := Read(beforeCardDump)
	if err != nil {
		t.Fatal(err)
	}
	legacy := replica.LegacySections()
	if !maps.EqualFunc(legacy, old.Devices, maps.Equal) {
		t.Fatalf("replica's legacy sections %v, the old build's dump %v", legacy, old.Devices)
	}
}

// `tandem schema check OLD NEW` exits 0 for the old dump against this
// build's, printing the note (the command, built and run).
func TestSchemaCheckCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the command")
	}
	bin := t.TempDir() + "/tandem"
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/tandem").CombinedOutput(); err != nil {
		t.Fatalf("build: %v: %s", err, out)
	}
	dump, err := exec.Command(bin, "schema", "dump").Output()
	if err != nil {
		t.Fatal(err)
	}
	nw := t.TempDir() + "/new.json"
	if err := os.WriteFile(nw, dump, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "schema", "check", beforeCardDump, nw).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "compatible:") || !strings.Contains(string(out), "note: synth device \"synth-nic\"") {
		t.Fatalf("schema check old new: %v\n%s", err, out)
	}
	t.Logf("%s", out)
	// Backwards (a build with the card as OLD, one without as NEW) the
	// card is a device the other build lacks: exit 1.
	if out, err := exec.Command(bin, "schema", "check", nw, beforeCardDump).CombinedOutput(); err == nil || !strings.Contains(string(out), `"synth-nic" (version 1) is unknown to the new build`) {
		t.Fatalf("schema check new old: %v\n%s", err, out)
	}
}
