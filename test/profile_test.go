package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The content and write profiles (issue 11): bad input is refused in one
// line with exit 2; a guest with an incompressible fill and whole-page
// random writes migrates and is protected with equal digests on both
// sides (the profile travels in the guest configuration of the hello).

func TestProfileBadInput(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		empty := filepath.Join(t.TempDir(), "empty")
		if err := os.WriteFile(empty, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			args []string
			flag string
		}{
			{[]string{"--fill", "bogus"}, "--fill"},
			{[]string{"--fill", "file:"}, "--fill"},
			{[]string{"--fill", "file:/no/such/file"}, "--fill"},
			{[]string{"--fill", "file:" + empty}, "--fill"},
			{[]string{"--write-bytes", "7"}, "--write-bytes"},
			{[]string{"--write-bytes", "4097"}, "--write-bytes"},
			{[]string{"--write-data", "zeros"}, "--write-data"},
		} {
			args := append([]string{"run", "--guest", kind, "--workload", "dirty", "--touch", "1MiB"}, tc.args...)
			r := runCLI(t, 30*time.Second, append(args, "--api", freeAddr(t), "--console", freeAddr(t))...)
			msg := strings.TrimSpace(r.stderr)
			if r.code != 2 || strings.Contains(msg, "\n") || !strings.Contains(msg, tc.flag) || !strings.Contains(msg, "want") {
				t.Errorf("tandem %s: exit %d, stderr %q; want exit 2 and one line naming %s and the accepted forms", strings.Join(args, " "), r.code, r.stderr, tc.flag)
			}
		}
	})
}

func profileArgs(kind, memory, touch string, rate string, profile ...string) []string {
	a := []string{"run", "--guest", kind, "--memory", memory, "--workload", "dirty", "--touch", touch,
		"--dirty-rate", rate, "--dirty-pattern", "random"}
	return append(a, profile...)
}

// TestMigrateProfiles: random fill, 4096-byte random writes at 5,000
// pages/s; the stream cannot compress it, and both ends agree.
func TestMigrateProfiles(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		src := startWithPorts(t, "source-"+kind, false, profileArgs(kind, "256MiB", "64MiB", "5000",
			"--fill", "random", "--write-bytes", "4096", "--write-data", "random")...)
		dst := startReceiver(t)
		// The micro-guest generates the fill at CPL3 behind write faults:
		// give both guests time to finish it (a touch that is not done
		// goes on at the destination, which is correct but sends less).
		waitWorkload(t, src, 64<<20)
		time.Sleep(time.Second)
		st := mustMigrate(t, src, dst.data, "--downtime-limit", downtimeFlag)
		checkSwitchover(t, src, dst, st)
		if st.TransferredBytes < 48<<20 {
			t.Errorf("%d bytes on the wire for 64 MiB of random pages: the fill did not reach memory", st.TransferredBytes)
		}
		t.Logf("total %d ms, downtime %d ms, wire %.1f MiB", st.TotalTimeMs, st.DowntimeMs, float64(st.TransferredBytes)/(1<<20))
	})
}

// TestFTProfiles: a mixed fill with 256-byte text writes, protected with
// per-epoch digest verification.
func TestFTProfiles(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		pri, _, _ := startPair(t, kind, primaryOpts{memory: "64MiB", workload: "dirty", touch: "16MiB", dirtyRate: 2000, epoch: "20ms", verify: true,
			extra: []string{"--fill", "mixed", "--write-bytes", "256", "--write-data", "text"}})
		st := waitFT(t, pri, 60*time.Second, "100 verified epochs", func(s ftStatus) bool { return s.VerifiedEpochs >= 100 || s.DigestMismatches > 0 })
		if st.DigestMismatches != 0 {
			t.Fatalf("%d digest mismatches; last: %s", st.DigestMismatches, st.LastMismatch)
		}
		if st.EpochRawBytes == 0 {
			t.Errorf("no dirty pages shipped: the workload did not run")
		}
		t.Logf("%d epochs verified, wire/raw %.3f, pause p99 %.2f ms", st.VerifiedEpochs, float64(st.EpochWireBytes)/float64(st.EpochRawBytes), st.PauseP99Ms)
	})
}

// TestMigrateFileFill: a guest filled from a file migrates and is
// protected after the file is gone: only the booting source reads it.
func TestMigrateFileFill(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		file := filepath.Join(t.TempDir(), "image")
		if err := os.WriteFile(file, []byte(strings.Repeat("a replayed memory image\n", 5000)), 0o600); err != nil {
			t.Fatal(err)
		}
		src := startWithPorts(t, "source-"+kind, false, profileArgs(kind, "128MiB", "32MiB", "2000", "--fill", "file:"+file)...)
		waitWorkload(t, src, 32<<20)
		if err := os.Remove(file); err != nil {
			t.Fatal(err)
		}
		dst := startReceiver(t)
		st := mustMigrate(t, src, dst.data, "--downtime-limit", downtimeFlag)
		checkSwitchover(t, src, dst, st)

		pri, _, _ := startPair(t, kind, primaryOpts{memory: "64MiB", workload: "dirty", touch: "16MiB", dirtyRate: 1000, epoch: "20ms", verify: true,
			extra: []string{"--fill", "file:" + writeTemp(t, "pair-image", strings.Repeat("pair image ", 3000))}})
		ft := waitFT(t, pri, 60*time.Second, "50 verified epochs", func(s ftStatus) bool { return s.VerifiedEpochs >= 50 || s.DigestMismatches > 0 })
		if ft.DigestMismatches != 0 {
			t.Fatalf("%d digest mismatches; last: %s", ft.DigestMismatches, ft.LastMismatch)
		}
	})
}

func writeTemp(t *testing.T, name, content string) string {
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
