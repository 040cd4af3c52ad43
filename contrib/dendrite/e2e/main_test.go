package e2e

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// buildTimeout covers a cold build of dendrite-asdispatch (about 7 minutes
// of wall time on a shared 2-core machine) with room to spare; the tests'
// own deadlines then start from a cached binary.
const buildTimeout = 20 * time.Minute

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	start := time.Now()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building dendrite-asdispatch:", err)
		os.Exit(1)
	}
	if d := time.Since(start); d > time.Second {
		fmt.Fprintf(os.Stderr, "e2e: built %s in %s\n", bin, d.Round(time.Second))
	}
	os.Exit(m.Run())
}
