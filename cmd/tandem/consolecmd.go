package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
)

func init() {
	register("console", "talk to the guest's console, following the primary across failovers", cmdConsole)
}

// cmdConsole copies stdin lines to the guest's console and its output to
// stdout. Given every node's console address, it follows the primary: a
// node that does not run the guest turns clients away, so on any loss the
// client tries the addresses in turn until one serves, for at most
// --timeout. Lines typed while no node serves are resent on reconnect
// (the kv protocol answers a resent request from its record).
func cmdConsole(args []string) error {
	fs := newFlagSet("console")
	connect := fs.String("connect", "127.0.0.1:7071", "console addresses of every node, comma-separated")
	timeout := fs.Duration("timeout", 30*time.Second, "give up when no node serves the console for this long")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	addrs := strings.Split(*connect, ",")
	for _, a := range addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return usagef("--connect %q: want HOST:PORT[,HOST:PORT...]", a)
		}
	}
	lines := make(chan string, 1024)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			lines <- sc.Text() + "\n"
		}
	}()
	var unsent []string // sent on a connection that died before any reply
	next := 0
	for {
		conn, err := dialPrimary(addrs, &next, *timeout, id)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "tandem console: connected to %s\n", conn.RemoteAddr())
		var mu sync.Mutex
		got := make(chan struct{}, 1)
		readDone := make(chan error, 1)
		go func() {
			r := bufio.NewReader(conn)
			for {
				l, err := r.ReadString('\n')
				if l != "" {
					if strings.HasPrefix(l, "ERR not the primary") {
						readDone <- errors.New("not the primary")
						return
					}
					os.Stdout.WriteString(l)
					mu.Lock()
					unsent = nil
					mu.Unlock()
					select {
					case got <- struct{}{}:
					default:
					}
				}
				if err != nil {
					readDone <- err
					return
				}
			}
		}()
		mu.Lock()
		resend := unsent
		mu.Unlock()
		// A node that accepts but does not read must not hold the
		// resend forever: the same deadline as pump's writes.
		for _, l := range resend {
			conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write([]byte(l)); err != nil {
				break
			}
		}
		err = pump(conn, lines, readDone, &mu, &unsent)
		if err == io.EOF {
			// stdin ended: wait briefly for the last replies (output
			// clears unsent), with the connection still open; closing it
			// first cut off every reply not yet read.
			for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); {
				mu.Lock()
				pending := len(unsent)
				mu.Unlock()
				if pending == 0 {
					break
				}
				select {
				case <-readDone:
				case <-got:
					continue
				case <-time.After(20 * time.Millisecond):
					continue
				}
				break
			}
			conn.Close()
			return nil
		}
		conn.Close()
		fmt.Fprintf(os.Stderr, "tandem console: lost %s (%v); looking for the primary\n", conn.RemoteAddr(), err)
	}
}

func pump(conn net.Conn, lines <-chan string, readDone <-chan error, mu *sync.Mutex, unsent *[]string) error {
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return io.EOF
			}
			mu.Lock()
			*unsent = append(*unsent, l)
			mu.Unlock()
			conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write([]byte(l)); err != nil {
				return err
			}
		case err := <-readDone:
			return err
		}
	}
}

// dialPrimary tries the addresses in turn, starting at *next, until one
// accepts and does not turn the client away, for at most timeout. With id
// every connection is mutual TLS against the cluster's CA.
func dialPrimary(addrs []string, next *int, timeout time.Duration, id *trust.Identity) (net.Conn, error) {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for attempt := 0; time.Now().Before(deadline); attempt++ {
		a := addrs[*next%len(addrs)]
		*next++
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := trust.Dial(ctx, id, a, "")
		cancel()
		if err != nil {
			lastErr = err
		}
		if err == nil {
			// A node that does not serve says so at once.
			conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			var b [1]byte
			n, rerr := conn.Read(b[:])
			conn.SetReadDeadline(time.Time{})
			if n == 0 && rerr != nil && isTimeout(rerr) {
				return conn, nil
			}
			if rerr != nil {
				lastErr = rerr // a refused certificate shows here
			}
			conn.Close()
		}
		if attempt%len(addrs) == len(addrs)-1 {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if lastErr != nil {
		return nil, fmt.Errorf("no node served the console within %v (tried %s; last error: %v)", timeout, strings.Join(addrs, ", "), lastErr)
	}
	return nil, fmt.Errorf("no node served the console within %v (tried %s)", timeout, strings.Join(addrs, ", "))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
