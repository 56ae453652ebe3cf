package e2e

import (
	"bufio"
	"net"
	"strings"
	"testing"
)

// TestKVReplyLineBounded: a node that sends a line past maxReplyLine gets
// an error, not a buffer of whatever it sends; a normal line reads whole.
func TestKVReplyLineBounded(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		b.Write([]byte("c:1 OK v\n" + strings.Repeat("x", maxReplyLine+10) + "\n"))
	}()
	c := &KVClient{r: bufio.NewReader(a)}
	if l, err := c.readLine(); err != nil || l != "c:1 OK v\n" {
		t.Fatalf("first line %q, %v", l, err)
	}
	if _, err := c.readLine(); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("an over-long line: %v", err)
	}
}
