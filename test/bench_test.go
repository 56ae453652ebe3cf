package test

import "testing"

// benchScenario is one BenchmarkMigrate case: a guest of the size
// (1 GiB, 512 MiB touched), dirtying or not, over loopback or a shaped link.
type benchScenario struct {
	name      string
	dirtyRate int
	linkBps   uint64 // 0: straight loopback
	// maxTime bounds each migration; an uncompressed run that does not
	// converge by then is reported (converged 0) rather than failed.
	maxTime string
}

var benchScenarios = []benchScenario{
	{name: "idle-1GiB"},
	{name: "dirty-25k", dirtyRate: 25000},
	{name: "dirty-25k-100Mbit", dirtyRate: 25000, linkBps: 100e6, maxTime: "2m"},
}

// BenchmarkMigrate migrates real tandem processes per iteration and reports
// query-migrate's figures: total time, downtime and bytes on the wire.
// Each scenario runs with compression none first, the baseline; the
// compressed run then reports its figures as ratios to that baseline
// measured in the same process. Process start and the guest's first touch
// are outside the timer.
func BenchmarkMigrate(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for _, sc := range benchScenarios {
				b.Run(sc.name, func(b *testing.B) {
					var baseline *benchFigures
					for _, comp := range []string{"none", "default"} {
						b.Run("compression="+comp, func(b *testing.B) {
							f := benchMigrate(b, kind, sc, comp)
							if comp == "none" {
								baseline = &f
							} else if baseline != nil && baseline.wire > 0 && baseline.total > 0 {
								b.ReportMetric(f.wire/baseline.wire, "wire/none")
								b.ReportMetric(f.total/baseline.total, "time/none")
							}
						})
					}
				})
			}
		})
	}
}

// BenchmarkMigrateTLS: the 1 GiB guest (512 MiB touched) migrated over
// loopback in plaintext, then with mutual TLS between source and
// destination (and on the APIs `tandem migrate` talks to), in the same
// run: idle, and dirtying 25,000 pages/s; default compression.
func BenchmarkMigrateTLS(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for _, sc := range benchScenarios[:2] {
				b.Run(sc.name, func(b *testing.B) {
					pki := newPKI(b, "src", "dst", operator)
					var plain benchFigures
					for _, mode := range []string{"plaintext", "tls"} {
						b.Run(mode, func(b *testing.B) {
							if mode == "plaintext" {
								plain = benchMigrateWith(b, kind, sc, "default", nil)
								return
							}
							f := benchMigrateWith(b, kind, sc, "default", pki)
							if plain.total > 0 {
								b.ReportMetric(f.total/plain.total, "time/plaintext")
							}
						})
					}
				})
			}
		})
	}
}

// benchFigures are the means over b.N migrations.
type benchFigures struct {
	total, downtime, wire float64
	converged             float64
}

func benchMigrate(b *testing.B, kind string, sc benchScenario, comp string) benchFigures {
	return benchMigrateWith(b, kind, sc, comp, nil)
}

// benchMigrateWith is benchMigrate, over mutual TLS when pki is set.
func benchMigrateWith(b *testing.B, kind string, sc benchScenario, comp string, pki *testPKI) benchFigures {
	var sum benchFigures
	var tlsArgs []string
	if pki != nil {
		tlsArgs = pki.nodeArgs(operator)
	}
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		src := startSource(b, kind, guestOpts{memory: "1GiB", touch: "512MiB", dirtyRate: sc.dirtyRate, pki: pki})
		var dst *node
		if pki != nil {
			dst = startReceiverTLS(b, pki, "dst")
		} else {
			dst = startReceiver(b)
		}
		to := dst.data
		if sc.linkBps > 0 {
			to = startProxy(b, dst.data, sc.linkBps).Addr()
		}
		waitWorkload(b, src, 512<<20)
		b.StartTimer()
		r, st := migrate(b, src, to, append([]string{"--downtime-limit", downtimeFlag, "--compression", comp, "--max-time", orStr(sc.maxTime, "5m")}, tlsArgs...)...)
		b.StopTimer()
		if r.code != 0 || st.Status != "completed" {
			if sc.maxTime == "" || st.Status != "failed" {
				b.Fatalf("migrate exit %d, status %q\n%s", r.code, st.Status, r.stderr)
			}
			after := mustStatus(b, src)
			b.Logf("%s/%s/%s: did not converge within %s: %d rounds, %.1f MiB sent, %.1f MiB remaining, throttle %d%%, expected downtime %d ms: %s",
				kind, sc.name, comp, sc.maxTime, after.DirtySyncCount, float64(after.TransferredBytes)/(1<<20), float64(after.RemainingBytes)/(1<<20),
				ptrInt(after.ThrottlePercent), after.ExpectedDowntimeMs, after.Error)
			sum.total += float64(after.TotalTimeMs)
			sum.wire += float64(after.TransferredBytes)
			src.kill()
			dst.kill()
			continue
		}
		sum.converged++
		if st.SwitchoverDigest == "" || st.SwitchoverDigest != st.DestinationDigest {
			b.Fatalf("switchover digests differ: %q vs %q", st.SwitchoverDigest, st.DestinationDigest)
		}
		sum.total += float64(st.TotalTimeMs)
		sum.downtime += float64(st.DowntimeMs)
		sum.wire += float64(st.TransferredBytes)
		b.Logf("%s/%s/%s: total %d ms, downtime %d ms (limit %d), wire %.1f MiB, %d syncs, throttle %d%%, %d attempts",
			kind, sc.name, comp, st.TotalTimeMs, st.DowntimeMs, downtimeLimitMs, float64(st.TransferredBytes)/(1<<20),
			st.DirtySyncCount, ptrInt(st.ThrottlePercent), st.CompletionAttempts)
		src.kill()
		dst.kill()
	}
	n := float64(b.N)
	f := benchFigures{sum.total / n, sum.downtime / max(sum.converged, 1), sum.wire / n, sum.converged / n}
	b.ReportMetric(f.total, "total-ms")
	b.ReportMetric(f.downtime, "downtime-ms")
	b.ReportMetric(f.converged, "converged")
	b.ReportMetric(f.wire/(1<<20), "wire-MiB")
	return f
}
