package guest

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"golang.org/x/sys/unix"
)

// A MemWriter's writes land at Flush, not before, in batches of up to
// maxIov pages, the same bytes a copy writes; with kernel writes off it
// copies at once.
func TestMemWriter(t *testing.T) {
	if !KernelWrites() {
		t.Log("process_vm_writev refused here: only the copy path is tested")
	}
	const pages = 2*maxIov + 7
	mem, err := unix.Mmap(-1, 0, pages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	want := make([]byte, len(mem))
	src := make([]byte, len(mem))
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	var w MemWriter
	order := rng.Perm(pages)
	for k, p := range order {
		d, s := mem[p*PageSize:(p+1)*PageSize], src[k*PageSize:(k+1)*PageSize]
		copy(want[p*PageSize:], s)
		w.Write(d, s)
		if KernelWrites() && k < maxIov-1 && !bytes.Equal(d, make([]byte, PageSize)) {
			t.Fatalf("write %d landed before Flush", k)
		}
	}
	if KernelWrites() && w.Pending() != pages%maxIov {
		t.Fatalf("%d pending, want %d (a call per %d pages)", w.Pending(), pages%maxIov, maxIov)
	}
	w.Flush()
	if w.Pending() != 0 || !bytes.Equal(mem, want) {
		t.Fatal("memory differs from the copies after Flush")
	}

	// Dropped writes never land.
	w.Write(mem[:PageSize], make([]byte, PageSize))
	w.Drop()
	w.Flush()
	if !bytes.Equal(mem[:PageSize], want[:PageSize]) {
		t.Fatal("a dropped write landed")
	}

	// Refused: the writer copies at once, but never ahead of a write
	// queued before: the last write to a page wins.
	was := kernelWritesOff.Load()
	defer kernelWritesOff.Store(was)
	ones, twos := bytes.Repeat([]byte{1}, PageSize), bytes.Repeat([]byte{2}, PageSize)
	w.Write(mem[:PageSize], ones)
	kernelWritesOff.Store(true)
	w.Write(mem[:PageSize], twos)
	w.Flush()
	if !bytes.Equal(mem[:PageSize], twos) {
		t.Fatal("a write queued before kernel writes went off landed after a later one")
	}
	w.Write(mem[:PageSize], make([]byte, PageSize))
	if w.Pending() != 0 || !bytes.Equal(mem[:PageSize], make([]byte, PageSize)) {
		t.Fatal("with kernel writes off, a write is not copied at once")
	}
}

// BenchmarkMemWriter writes 2,000 random pages of 512 MiB populated long
// before, by MemWriter and by copy (the baseline).
func BenchmarkMemWriter(b *testing.B) {
	const size = 512 << 20
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	PrefaultWrite(mem, false)
	src := make([]byte, 2000*PageSize)
	for i := range src {
		src[i] = byte(i * 7)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, how := range []string{"copy", "memwriter"} {
		b.Run(how, func(b *testing.B) {
			var w MemWriter
			b.SetBytes(int64(len(src)))
			for b.Loop() {
				for k := range 2000 {
					p := rng.IntN(size / PageSize)
					d, s := mem[p*PageSize:(p+1)*PageSize], src[k*PageSize:(k+1)*PageSize]
					if how == "copy" {
						copy(d, s)
					} else {
						w.Write(d, s)
					}
				}
				w.Flush()
			}
		})
	}
}
