package kvm

import (
	"strings"
	"testing"
)

func TestKVOverConsole(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(kvConfig(64<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	expect(t, ask(t, g, lr, "c1:1 SET k1 hello"), "c1:1 OK")
	expect(t, ask(t, g, lr, "c1:2 GET k1"), "c1:2 OK hello")
	expect(t, ask(t, g, lr, "c1:3 GET nope"), "c1:3 NOTFOUND")
	expect(t, ask(t, g, lr, "c1:4 DEL k1"), "c1:4 OK")
	expect(t, ask(t, g, lr, "c1:5 DEL k1"), "c1:5 NOTFOUND")
	expect(t, ask(t, g, lr, "c1:6 GET k1"), "c1:6 NOTFOUND")
	// a retry is answered from the record, not applied again
	expect(t, ask(t, g, lr, "c2:1 SET x 1"), "c2:1 OK")
	expect(t, ask(t, g, lr, "c1:7 SET x 2"), "c1:7 OK")
	expect(t, ask(t, g, lr, "c2:1 SET x 1"), "c2:1 OK")
	expect(t, ask(t, g, lr, "c2:2 GET x"), "c2:2 OK 2")
	// malformed
	expect(t, ask(t, g, lr, "garbage"), "ERR missing <client>:<seq>")
	expect(t, ask(t, g, lr, "c!:1 GET x"), "ERR bad client: want [A-Za-z0-9_-]{1,32}")
	expect(t, ask(t, g, lr, "c1:x GET x"), "ERR bad seq: want a decimal uint64")
	expect(t, ask(t, g, lr, "c1:99999999999999999999 GET x"), "ERR bad seq: want a decimal uint64")
	expect(t, ask(t, g, lr, ""), "ERR empty request")
	expect(t, ask(t, g, lr, "c1:8"), "c1:8 ERR missing command: want SET, GET or DEL")
	expect(t, ask(t, g, lr, "c1:8 FROB x"), "c1:8 ERR unknown command: want SET, GET or DEL")
	expect(t, ask(t, g, lr, "c1:9 SET bad/key v"), "c1:9 ERR bad key: want [A-Za-z0-9_.-]{1,64}")
	expect(t, ask(t, g, lr, "c1:10 SET k"), "c1:10 ERR SET takes 2 argument(s) separated by single spaces")
	expect(t, ask(t, g, lr, "c1:10 GET k  "), "c1:10 ERR GET takes 1 argument(s) separated by single spaces")
	expect(t, ask(t, g, lr, "c1:11 SET k "+strings.Repeat("v", 257)), "c1:11 ERR bad value: want 1 to 256 printable ASCII bytes without spaces")
	expect(t, ask(t, g, lr, "c1:12 SET k "+strings.Repeat("v", 600)), "ERR line too long")
	// malformed requests are not recorded: seq 8 is still new
	expect(t, ask(t, g, lr, "c1:8 SET k v\r"), "c1:8 OK")
	expect(t, ask(t, g, lr, "c1:13 GET k"), "c1:13 OK v")
	// a request over the old seq of another command is answered from the record
	expect(t, ask(t, g, lr, "c1:5 GET k"), "c1:13 OK v")
	if err := g.Err(); err != nil {
		t.Fatal(err)
	}
}
