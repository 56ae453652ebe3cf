package checkpoint

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// BenchmarkSendPath: the send path of a live round over TCP loopback, as
// a migration runs it (issue 11 item 3): pages are copied from "guest
// memory" into a snapshot (the one copy a running guest needs), encoded
// and written through a 256 KiB buffer to a socket whose other end reads
// and discards. Beside it, in the same run: copy, the same bytes written
// raw through the same buffer and socket (the least any sender does).
// 64 MiB of random or mixed pages per operation; streams is
// Options.Encoders, with streams*1024 pages per WritePages call.
func BenchmarkSendPath(b *testing.B) {
	const pages = 16384 // 64 MiB
	for _, fill := range []string{"random", "mixed"} {
		mem := residentMem(pages * guest.PageSize)
		kind := guest.FillKind(fill)
		for p := uint64(0); p < pages; p++ {
			guest.FillPage(mem[p*guest.PageSize:(p+1)*guest.PageSize], kind, 1, p)
		}
		b.Run(fill+"/copy", func(b *testing.B) {
			conn, bw := loopback(b)
			b.SetBytes(int64(len(mem)))
			cpu := cpuTime()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for off := 0; off < len(mem); off += 1 << 20 {
					if _, err := bw.Write(mem[off : off+1<<20]); err != nil {
						b.Fatal(err)
					}
				}
				if err := bw.Flush(); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			reportCPU(b, cpu)
			conn.Close()
		})
		for _, comp := range []Compression{CompressNone, CompressDefault} {
			for _, streams := range []int{1, 2, 4} {
				b.Run(fmt.Sprintf("%s/%v/streams=%d", fill, comp, streams), func(b *testing.B) {
					conn, bw := loopback(b)
					h := Header{Build: "bench", Kind: "synth", Regions: []MemRegion{{Size: uint64(len(mem))}}}
					w, err := NewWriter(bw, h, Options{Compression: comp, Encoders: streams, CacheBytes: -1})
					if err != nil {
						b.Fatal(err)
					}
					defer w.Close()
					batch := streams * DefaultBatchPages
					snap := residentMem(batch * guest.PageSize)
					ps := make([]Page, 0, batch)
					var wire int64
					b.SetBytes(int64(len(mem)))
					cpu := cpuTime()
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						for first := 0; first < pages; first += batch {
							ps = ps[:0]
							for p := first; p < min(first+batch, pages); p++ {
								s := snap[(p-first)*guest.PageSize : (p-first+1)*guest.PageSize]
								copy(s, mem[p*guest.PageSize:(p+1)*guest.PageSize])
								ps = append(ps, Page{Index: uint64(p), Data: s})
							}
							if err := w.WritePages(ps); err != nil {
								b.Fatal(err)
							}
							sum, err := w.EndEpoch(uint64(i*pages + first + 1))
							if err != nil {
								b.Fatal(err)
							}
							wire += int64(sum.WireBytes)
						}
						if err := bw.Flush(); err != nil {
							b.Fatal(err)
						}
					}
					b.StopTimer()
					reportCPU(b, cpu)
					reportRatio(b, int64(b.N)*int64(len(mem)), wire)
					conn.Close()
				})
			}
		}
	}
}

// loopback returns a TCP connection whose peer reads and discards, and a
// 256 KiB buffer over it (the migration link's).
func loopback(b *testing.B) (net.Conn, *bufio.Writer) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, c)
		c.Close()
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	return conn, bufio.NewWriterSize(conn, 256<<10)
}

// cpuTime is the process's CPU time so far (user and system): on a shared
// machine it moves far less than wall time with other people's load.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU time per operation since from: sender and
// the discarding receiver together.
func reportCPU(b *testing.B, from time.Duration) {
	b.ReportMetric(float64(cpuTime()-from)/float64(time.Millisecond)/float64(b.N), "cpu-ms/op")
}
