package replica

import (
	"maps"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
	"github.com/tandemvm/tandem/guest/kvm"
)

// A kvm guest's Hello lists the sections its state carries (it used to
// list none, so a receiver checked nothing), and a receiver that does
// not load one of them (here: kvm-pvdisk, for a guest with a disk)
// refuses in one line before any stream.
func TestKVMHelloListsSections(t *testing.T) {
	if err := kvm.Available(); err != nil {
		t.Skipf("no usable KVM: %v", err)
	}
	if _, err := kvm.DefaultImage(); err != nil {
		t.Skipf("no micro-guest image: %v", err)
	}
	d, err := block.Open(filepath.Join(t.TempDir(), "disk.img"), block.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := guest.Config{Memory: 32 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g, err := kvm.NewWithOptions(cfg, kvm.Options{Disk: d})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	h := Hello{Purpose: PurposeReplicate, Kind: kvm.Kind, Config: cfg, Build: "new", Devices: guest.StateSectionsOf(g)}
	for _, name := range []string{"kvm-machine", "kvm-vcpu", "kvm-pvdisk"} {
		if _, ok := h.Devices[name]; !ok {
			t.Fatalf("a kvm guest with a disk lists %v: no %s", h.Devices, name)
		}
	}
	noDisk := func(kind string) (map[string]uint32, bool) {
		m := maps.Clone(kvm.StateVersions())
		delete(m, "kvm-pvdisk")
		return m, kind == kvm.Kind
	}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "no-disk", Sections: noDisk}, nil)
	defer sec.Close()
	addr, done := serveOnce(t, sec)
	_, err = dialSections(addr, h, g)
	if err == nil || !strings.Contains(err.Error(), `device section "kvm-pvdisk"`) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Dial: %v, want a one-line refusal naming kvm-pvdisk", err)
	}
	t.Logf("refused: %v", err)
	waitServe(t, done, 5*time.Second)
}
