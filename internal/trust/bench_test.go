package trust

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// The cost of TLS itself on loopback, without Tandem around it: what a
// 64-byte request and reply (an acknowledgement) and a 256 KiB write (a
// chunk of an epoch's stream) take over plaintext and over this
// package's mutual TLS. docs/PERFORMANCE.md ("TLS cost") quotes them
// beside the end-to-end figures.

func benchPair(b *testing.B, withTLS bool) (client, server net.Conn) {
	b.Helper()
	var id *Identity
	if withTLS {
		dir := filepath.Join(b.TempDir(), "certs")
		if err := NewCA(dir, "bench CA", time.Now()); err != nil {
			b.Fatal(err)
		}
		if err := Issue(dir, "n", IssueOptions{}, time.Now()); err != nil {
			b.Fatal(err)
		}
		var err error
		id, err = Load(Config{CAFile: filepath.Join(dir, CAFile), CertFile: filepath.Join(dir, CertFile("n")), KeyFile: filepath.Join(dir, KeyFile("n"))})
		if err != nil {
			b.Fatal(err)
		}
	}
	ln, err := Listen(id, false, "bench", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil && Handshake(c, 5*time.Second) != nil {
			c.Close()
			c = nil
		}
		accepted <- c
	}()
	client, err = Dial(context.Background(), id, ln.Addr().String(), "n")
	if err != nil {
		b.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		b.Fatal("server handshake failed")
	}
	b.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func BenchmarkLoopbackRoundTrip64(b *testing.B) {
	for _, mode := range []string{"plaintext", "tls"} {
		b.Run(mode, func(b *testing.B) {
			c, s := benchPair(b, mode == "tls")
			go func() {
				buf := make([]byte, 64)
				for {
					if _, err := io.ReadFull(s, buf); err != nil {
						return
					}
					if _, err := s.Write(buf); err != nil {
						return
					}
				}
			}()
			buf := make([]byte, 64)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkLoopbackStream256K(b *testing.B) {
	for _, mode := range []string{"plaintext", "tls"} {
		b.Run(mode, func(b *testing.B) {
			c, s := benchPair(b, mode == "tls")
			go io.Copy(io.Discard, s)
			buf := make([]byte, 256<<10)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
