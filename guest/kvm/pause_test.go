package kvm

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// TestEncodeStateMatchesCodec: encodeState writes the bytes the
// reflective encoder writes for the same vcpuStateV1 (a saved state, and
// the same with random values and list lengths), so the format is
// unchanged.
func TestEncodeStateMatchesCodec(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(kvConfig(64<<20, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	time.Sleep(20 * time.Millisecond)
	mustPause(t, g)
	rng := rand.New(rand.NewPCG(1, 2))
	num := func() uint64 {
		// Every width msgpack distinguishes.
		switch rng.IntN(6) {
		case 0:
			return uint64(rng.IntN(128))
		case 1:
			return 128 + uint64(rng.IntN(128))
		case 2:
			return uint64(rng.IntN(math.MaxUint16))
		case 3:
			return uint64(rng.Uint32())
		case 4:
			return math.MaxUint64
		}
		return rng.Uint64()
	}
	for _, v := range g.vcpus {
		s, err := v.save()
		if err != nil {
			t.Fatal(err)
		}
		check := func(what string, s vcpuStateV1) {
			t.Helper()
			want, err := encode(s)
			if err != nil {
				t.Fatal(err)
			}
			got, err := v.encodeState(&s)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("vCPU %d, %s: encodeState differs from the codec (%d vs %d bytes)", v.id, what, len(got), len(want))
			}
			var back vcpuStateV1
			if err := decode(got, &back); err != nil {
				t.Fatalf("vCPU %d, %s: decode: %v", v.id, what, err)
			}
		}
		check("saved", s)
		for i := 0; i < 200; i++ {
			r := s
			r.MPState = uint32(num())
			r.TSC = num()
			r.Regs.RIP, r.Regs.RAX, r.Regs.RFLAGS = num(), num(), num()
			r.MSRs = make([]MSR, rng.IntN(70))
			if rng.IntN(10) == 0 {
				r.MSRs = nil
			}
			for j := range r.MSRs {
				r.MSRs[j] = MSR{Index: uint32(num()), Reserved: uint32(num()), Data: num()}
			}
			if rng.IntN(4) == 0 { // not the vCPU's own CPUID: encoded afresh
				r.CPUID = append([]cpuidEntry(nil), s.CPUID[:rng.IntN(len(s.CPUID)+1)]...)
				if len(r.CPUID) > 0 {
					r.CPUID[0].EAX = uint32(num())
				}
			}
			if rng.IntN(10) == 0 {
				r.XCRs = nil
			}
			check(fmt.Sprintf("random %d", i), r)
		}
	}
	// A whole saved machine decodes and loads back.
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.LoadState(st); err != nil {
		t.Fatalf("load what was saved: %v", err)
	}
}

// TestPauseSyncedState: the registers a pause leaves in kvm_run (sync
// regs) are the ones the ioctls read, whichever way the vCPU parked: in
// an idle wait (claimed without a kick) or kicked out of the guest while
// it ran; and a claimed vCPU that wakes during the pause does not run the
// guest (its state, and memory, stay as saved until the resume).
func TestPauseSyncedState(t *testing.T) {
	skipWithoutKVM(t)
	for _, c := range []struct {
		name string
		cfg  guest.Config
	}{
		{"idle-kv", kvConfig(64<<20, 1)},
		{"busy-dirty", dirtyConfig(64<<20, 8<<20, 50_000_000, guest.PatternRandom, 2)},
	} {
		t.Run(c.name, func(t *testing.T) {
			g, err := New(c.cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			var lr *lineReader
			if c.cfg.Workload.Kind == guest.WorkloadKV {
				lr = newLineReader()
				g.Console().SetOutput(lr.sink)
			}
			mustResume(t, g)
			if lr == nil {
				waitProgress(t, g, 1)
			}
			synced, claimed, idleThrough := 0, 0, 0
			for i := 0; i < 200; i++ {
				if lr != nil {
					ask(t, g, lr, fmt.Sprintf("s:%d SET k%d v%d", i, i, i))
					time.Sleep(time.Duration(rng(i)) * 100 * time.Microsecond)
				} else {
					time.Sleep(time.Millisecond)
				}
				// The first pause only starts the clean idles (cleanIdle).
				for _, v := range g.vcpus {
					if v.idleState.Load() == idleClean {
						claimed++
					}
				}
				mustPause(t, g)
				for _, v := range g.vcpus {
					if !v.synced.Load() {
						continue
					}
					synced++
					var r Regs
					var s Sregs
					var ev VCPUEvents
					if _, err := ioctlPtr(v.fd, kvmGetRegs, &r); err != nil {
						t.Fatal(err)
					}
					if _, err := ioctlPtr(v.fd, kvmGetSregs, &s); err != nil {
						t.Fatal(err)
					}
					if _, err := ioctlPtr(v.fd, kvmGetVCPUEvents, &ev); err != nil {
						t.Fatal(err)
					}
					if r != *v.syncedRegs() || s != *v.syncedSregs() || ev != *v.syncedEvents() {
						t.Fatalf("pause %d, vCPU %d: the synced registers differ from KVM's: regs %v sregs %v events %v",
							i, v.id, r == *v.syncedRegs(), s == *v.syncedSregs(), ev == *v.syncedEvents())
					}
				}
				if lr != nil && i%4 == 0 {
					// Input while paused wakes a claimed vCPU: it must
					// park, not serve the request.
					before, err := g.SaveState()
					if err != nil {
						t.Fatal(err)
					}
					if err := g.Console().Input([]byte(fmt.Sprintf("p:%d GET k%d\n", i, i))); err != nil {
						t.Fatal(err)
					}
					// The input wakes a claimed vCPU 0: wait until it has
					// (its thread may wait for a core), then it must have
					// parked rather than answered.
					deadline := time.Now().Add(5 * time.Second)
					for g.vcpus[0].idleState.Load() == idleClaimed && time.Now().Before(deadline) {
						time.Sleep(100 * time.Microsecond)
					}
					time.Sleep(2 * time.Millisecond)
					select {
					case l := <-lr.lines:
						t.Fatalf("pause %d: the paused guest answered %q", i, l)
					default:
					}
					after, err := g.SaveState()
					if err != nil {
						t.Fatal(err)
					}
					if !sameDevices(before, after) {
						t.Fatalf("pause %d: the paused guest's state changed", i)
					}
				}
				allIdle := true
				for _, v := range g.vcpus {
					allIdle = allIdle && v.idleState.Load() == idleClaimed
				}
				mustResume(t, g)
				// A claimed vCPU may wake between the look above and the
				// resume (its idle timer), never the other way round.
				if g.IdleThroughPause() && !allIdle {
					t.Fatalf("pause %d: IdleThroughPause, but a vCPU was not claimed and waiting just before the resume", i)
				}
				if g.IdleThroughPause() {
					idleThrough++
				}
				if lr != nil && i%4 == 0 {
					if g.IdleThroughPause() {
						t.Fatalf("pause %d: input woke the guest during the pause, yet it was idle through it", i)
					}
					expect(t, lr.next(t, 10*time.Second), fmt.Sprintf("p:%d OK v%d", i, i))
				}
			}
			t.Logf("%d vCPU pauses with synced registers, %d taken idle without a kick, %d pauses idle through (sync regs %v)", synced, claimed, idleThrough, g.syncRegs)
			if lr != nil && idleThrough == 0 {
				t.Error("no pause of the idle kv guest was idle through")
			}
			if g.syncRegs && synced == 0 {
				t.Error("no pause left its registers in kvm_run")
			}
			if lr != nil && claimed == 0 {
				t.Error("no idle vCPU was taken as parked")
			}
		})
	}
}

func rng(i int) int { return (i * 7) % 11 }

// sameDevices compares two machine states' vCPUs (registers and events;
// not the TSC, and not the devices: input queued while paused is state).
func sameDevices(a, b guest.MachineState) bool {
	if len(a.Devices) != len(b.Devices) {
		return false
	}
	for i := range a.Devices {
		da, db := a.Devices[i], b.Devices[i]
		if da.Name != db.Name {
			return false
		}
		switch da.Name {
		case stateVCPU:
			var sa, sb vcpuStateV1
			if decode(da.Fields, &sa) != nil || decode(db.Fields, &sb) != nil {
				return false
			}
			if sa.Regs != sb.Regs || sa.Sregs != sb.Sregs || !bytes.Equal(sa.Events, sb.Events) {
				return false
			}
		}
	}
	return true
}
