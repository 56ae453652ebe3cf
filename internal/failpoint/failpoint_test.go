package failpoint

import (
	"errors"
	"slices"
	"testing"
)

var (
	testA = New("failpoint-test.a")
	testB = New("failpoint-test.b")
)

func TestDisarmedIsInert(t *testing.T) {
	if err := testA.Hit(); err != nil {
		t.Fatalf("disarmed point returned %v", err)
	}
	if testA.Hits() != 0 {
		t.Fatalf("disarmed point counted %d hits", testA.Hits())
	}
}

func TestEnableAndDisable(t *testing.T) {
	boom := errors.New("boom")
	n := 0
	disable := testA.Enable(func() error {
		n++
		if n == 2 {
			return boom
		}
		return nil
	})
	if err := testA.Hit(); err != nil {
		t.Fatalf("first hit: %v", err)
	}
	err := testA.Hit()
	if !errors.Is(err, boom) || !errors.Is(err, ErrInjected) {
		t.Fatalf("second hit: %v, want boom wrapped in ErrInjected", err)
	}
	if err := testB.Hit(); err != nil {
		t.Fatalf("another point fired: %v", err)
	}
	if testA.Hits() != 2 {
		t.Fatalf("hits %d, want 2", testA.Hits())
	}
	disable()
	if err := testA.Hit(); err != nil {
		t.Fatalf("after disable: %v", err)
	}
	if n != 2 {
		t.Fatalf("action ran %d times, want 2", n)
	}
	d2 := testB.Enable(nil)
	if err := testB.Hit(); !errors.Is(err, ErrInjected) {
		t.Fatalf("nil action: %v", err)
	}
	d2()
}

func TestRegistry(t *testing.T) {
	if got := Names("failpoint-test."); !slices.Equal(got, []string{"failpoint-test.a", "failpoint-test.b"}) {
		t.Fatalf("Names = %v", got)
	}
	if p, ok := Lookup("failpoint-test.b"); !ok || p != testB {
		t.Fatalf("Lookup failed")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a duplicate name did not panic")
		}
	}()
	New("failpoint-test.a")
}

func BenchmarkDisarmedHit(b *testing.B) {
	for b.Loop() {
		if testA.Hit() != nil {
			b.Fatal("fired")
		}
	}
}
