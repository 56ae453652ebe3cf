package ft

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/failpoint"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/internal/vfs"
	"github.com/tandemvm/tandem/replica"
)

// The primary's and the witness's raft data dirs lose power at every
// step of publishing an identity file (cluster-id, then node-id: the
// vfs.publish failpoints, each fsync and rename), on their first start.
// The start fails with one line; the restart on what survived either
// works (the trio forms, the primary runs protected) or refuses in one
// line naming the file. raft.db is raft-boltdb's, on the real file
// system, and not swept (docs/DURABILITY.md).
func TestDriverIdentityCrashSweep(t *testing.T) {
	type rowT struct {
		node, point    string
		hit            int
		crash, restart string
	}
	var rows []rowT
	points := failpoint.Names("vfs.publish.")
	nodes := []string{"a", "w"}
	for _, node := range nodes {
		for _, point := range points {
			for hit := 1; hit <= 2; hit++ {
				// Without TANDEM_CRASH_SWEEP=full, one point per node and
				// file (the trio run is what costs).
				if !sweepFull() && point != vfs.FPPublishBeforeSyncDir.Name() {
					continue
				}
				r := rowT{node: node, point: point, hit: hit}
				t.Run(fmt.Sprintf("%s/%s/%d", node, strings.TrimPrefix(point, "vfs.publish."), hit), func(t *testing.T) {
					m := vfs.NewMemFS(uint64(hit))
					dir := t.TempDir() // the flock and raft.db live on the real file system
					role := failover.RolePrimary
					if node == "w" {
						role = failover.RoleWitness
					}
					peers := map[string]string{node: freeRaftAddrs(t, 1)[0], "x": "127.0.0.1:1", "y": "127.0.0.1:2"}
					p, _ := failpoint.Lookup(point)
					n := 0
					disable := p.Enable(func() error {
						if n++; n != hit {
							return nil
						}
						m.Crash(vfs.TearUnsynced)
						return errors.New("power loss")
					})
					_, err := failover.Open(failover.Config{ID: node, ClusterID: "ft-sweep", Role: role, Peers: peers, DataDir: dir, FS: m})
					disable()
					if err == nil || strings.Contains(err.Error(), "\n") {
						t.Fatalf("a start cut at %s: %v, want one line", point, err)
					}
					r.crash = err.Error()
					// The restart, inside a whole trio.
					dirs := raftDirs{}
					dirs[node] = struct {
						dir string
						fs  vfs.FS
					}{dir, m}
					c := newSweepClusterWith(t, replica.SyncDisk, dirs)
					r.restart = fmt.Sprintf("works: a runs protected at generation %d", c.a.c.State().Generation)
					for file, want := range map[string]string{"cluster-id": "ft-sweep\n", "node-id": node + "\n"} {
						if b, err := vfs.ReadFile(m, filepath.Join(dir, file)); err != nil || string(b) != want {
							t.Fatalf("%s after the restart: %q, %v", file, b, err)
						}
					}
				})
				rows = append(rows, r)
			}
		}
	}
	var b strings.Builder
	b.WriteString("\n| node | failpoint | identity file | first start | restart |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		file := "cluster-id"
		if r.hit == 2 {
			file = "node-id"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | fails: %s | %s |\n", r.node, r.point, file, r.crash, r.restart)
	}
	t.Log(b.String())
}

// A torn or corrupt identity file stops a witness or a member at start,
// in one line naming the file, and changes nothing in the data dir.
func TestDriverRefusesCorruptIdentityFile(t *testing.T) {
	for _, who := range []string{"witness", "member"} {
		for _, file := range []string{"cluster-id", "node-id"} {
			for name, content := range map[string]string{"torn (empty)": "", "zeros": "\x00\x00\x00\x00"} {
				t.Run(who+"/"+file+"/"+name, func(t *testing.T) {
					dir := filepath.Join(t.TempDir(), "data")
					peers := map[string]string{"n": freeRaftAddrs(t, 1)[0], "x": "127.0.0.1:1", "y": "127.0.0.1:2"}
					fcfg := failover.Config{ID: "n", ClusterID: "ft-sweep", Role: failover.RoleWitness, Peers: peers, DataDir: dir}
					if who == "member" {
						fcfg.Role = failover.RoleSecondary
					}
					node, err := failover.Open(fcfg)
					if err != nil {
						t.Fatal(err)
					}
					node.Close()
					path := filepath.Join(dir, file)
					if err := os.WriteFile(path, []byte(content), 0o640); err != nil {
						t.Fatal(err)
					}
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					if who == "witness" {
						err = RunWitness(ctx, WitnessConfig{Failover: fcfg, DataDir: dir, Log: quietLog()})
					} else {
						err = RunRaftMember(ctx, RaftConfig{
							Node:     NodeConfig{Role: "secondary", APIAddr: "127.0.0.1:0", ConsoleAddr: "127.0.0.1:0", Log: quietLog()},
							Failover: fcfg, DataAddr: "127.0.0.1:0", DataDir: filepath.Join(t.TempDir(), "member"), Epochs: testEpochs(),
							Receiver: &replica.Receiver{NewGuest: EmptyGuest, Build: version.Build(), Log: quietLog()},
						})
					}
					if !errors.Is(err, failover.ErrCorruptDataDir) || !strings.Contains(err.Error(), path) || strings.Contains(err.Error(), "\n") {
						t.Fatalf("a start with a %s %s: %v; want one line, ErrCorruptDataDir, naming %s", name, file, err, path)
					}
					if b, _ := os.ReadFile(path); string(b) != content {
						t.Fatalf("the refused start changed %s: %q", file, b)
					}
				})
			}
		}
	}
}
