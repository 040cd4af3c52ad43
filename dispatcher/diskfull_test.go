package dispatcher

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// mountTmpfs mounts a tmpfs of size bytes on a new directory, or skips the
// test where the machine does not allow it (TestStorageFaultRecovers covers
// the same path with an injected fault).
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	if os.Geteuid() != 0 {
		t.Skip("a real full disk needs root to mount a tmpfs; TestStorageFaultRecovers injects the fault instead")
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+strconv.Itoa(size), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs here (%v: %s); TestStorageFaultRecovers injects the fault instead", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// TestDiskFullLosesNothing fills the data dir (a 1 MiB tmpfs) while the AS
// is down, so nothing can be collected: Submit must fail with a clear error
// and change nothing, and once the disk grows, Submit works again and every
// acknowledged event, and only those, reaches the AS in order.
func TestDiskFullLosesNothing(t *testing.T) {
	dir := mountTmpfs(t, 1<<20)
	as := newFaultAS(t, "as", "500")
	set := setOf(t, as.registration())
	as.faulty.Store(true) // down: the backlog stays on disk
	d, err := New(context.Background(), Config{
		Registry: registry.NewRegistry(set), DataDir: dir,
		Logger: zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)),
		Queue:  queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(context.Background())

	pad := strings.Repeat("x", 4000)
	n := 0
	submit := func() error {
		n++
		return d.Submit(context.Background(), aliceEvent(n, pad))
	}
	var acked []int
	refused := map[int]bool{}
	var full error
	for full == nil && n < 10000 {
		if full = submit(); full == nil {
			acked = append(acked, n)
		} else {
			refused[n] = true
		}
	}
	if full == nil {
		t.Fatal("10,000 4 KB events fit in a 1 MiB tmpfs?")
	}
	if !strings.Contains(full.Error(), "full") {
		t.Errorf("Submit on a full disk: %v; want an error that says the disk is full", full)
	}
	t.Logf("disk full after %d events: %v", len(acked), full)
	for range 5 {
		if err := submit(); err == nil {
			acked = append(acked, n)
		} else {
			refused[n] = true
		}
	}

	if out, err := exec.Command("mount", "-o", "remount,size=64m", dir).CombinedOutput(); err != nil {
		t.Fatalf("grow the tmpfs: %v: %s", err, out)
	}
	for range 50 {
		if err := submit(); err != nil {
			t.Fatalf("Submit after space returned: %v", err)
		}
		acked = append(acked, n)
	}
	as.faulty.Store(false)

	deadline := time.Now().Add(30 * time.Second)
	for {
		as.mu.Lock()
		got := len(as.order)
		as.mu.Unlock()
		if got >= len(acked) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the AS got %d of %d acknowledged events", got, len(acked))
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // anything refused would have come by now
	as.mu.Lock()
	defer as.mu.Unlock()
	if len(as.order) != len(acked) {
		t.Errorf("the AS got %d events, %d were acknowledged", len(as.order), len(acked))
	}
	for i, got := range as.order {
		if i >= len(acked) || got != acked[i] {
			t.Fatalf("event %d at position %d; refused ones: %v", got, i, refused)
		}
	}
	t.Logf("%d events acknowledged, %d refused while the disk was full; all acknowledged ones delivered in order", len(acked), len(refused))
}
