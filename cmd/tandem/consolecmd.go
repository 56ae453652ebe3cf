package main

import (
	"bufio"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tandemvm/tandem/ft"
)

func init() {
	register("console", "talk to the guest's console, following the primary across failovers", cmdConsole)
}

// cmdConsole copies stdin lines to the guest's console and its output to
// stdout, following the primary (ft.ConsoleClient). The goroutine that
// reads stdin has no way to be stopped (a read of a terminal cannot be
// cut); the process ends with it.
func cmdConsole(args []string) error {
	fs := newFlagSet("console")
	connect := fs.String("connect", "127.0.0.1:7071", "console addresses of every node, comma-separated")
	timeout := fs.Duration("timeout", 30*time.Second, "give up when no node serves the console for this long")
	replyTimeout := fs.Duration("reply-timeout", ft.DefaultReplyTimeout, "a connection with no output this long after a line was sent is taken for lost (a network cut): look for the primary and resend; 0: never")
	id, err := parseClientFlags(fs, args)
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
	rt := *replyTimeout
	if rt <= 0 {
		rt = -1 // never
	}
	c := &ft.ConsoleClient{Addrs: addrs, Timeout: *timeout, ReplyTimeout: rt, TLS: id, Out: os.Stdout, Notes: os.Stderr}
	return c.Run(lines)
}
