package harness

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Building one source hash leaves other checkouts' binaries in place until
// they have gone unused for cacheMaxAge; partial builds go after tmpMaxAge.
func TestPruneCache(t *testing.T) {
	now := time.Now()
	dir := t.TempDir()
	files := []struct {
		name string
		age  time.Duration
		kept bool
	}{
		{"dendrite-asdispatch-" + DendriteVersion + "-new", 0, true},           // the one just built
		{"dendrite-asdispatch-" + DendriteVersion + "-other", time.Hour, true}, // another checkout's
		{"dendrite-asdispatch-" + DendriteVersion + "-stale", cacheMaxAge + time.Hour, false},
		{"dendrite-asdispatch-" + DendriteVersion + "-other.tmp42", time.Minute, true}, // a build under way
		{"dendrite-asdispatch-" + DendriteVersion + "-dead.tmp7", tmpMaxAge + time.Hour, false},
		{"dendrite-" + DendriteVersion + "-stock", cacheMaxAge + time.Hour, true}, // the other binary
	}
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, now.Add(-f.age), now.Add(-f.age)); err != nil {
			t.Fatal(err)
		}
	}
	pruneCache(dir, AsDispatch, filepath.Join(dir, files[0].name), now)
	for _, f := range files {
		_, err := os.Stat(filepath.Join(dir, f.name))
		if kept := err == nil; kept != f.kept {
			t.Errorf("%s: kept %v, want %v", f.name, kept, f.kept)
		}
	}
}
