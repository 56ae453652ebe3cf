package kvm

import (
	"testing"
	"time"
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
	expect(t, ask(t, g, lr, "garbage"), "ERR bad request id")
	expect(t, ask(t, g, lr, "c1:8 FROB x"), "c1:8 ERR unknown command")
	expect(t, ask(t, g, lr, "c1:9 SET bad/key v"), "c1:9 ERR bad key")
	expect(t, ask(t, g, lr, "c1:10 SET k"), "c1:10 ERR missing value")
	if err := g.Err(); err != nil {
		t.Fatal(err)
	}
	_ = time.Second
}
