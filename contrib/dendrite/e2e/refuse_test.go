package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// The binary refuses to start on a registration Dendrite accepts but our
// registry does not (a url key left out turns pushes off silently), and says
// which file and why.
func TestRefusesBadRegistration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	reg := filepath.Join(dir, "forgot-url.yaml")
	os.WriteFile(reg, []byte("id: forgot\nas_token: a\nhs_token: h\nsender_localpart: fbot\nnamespaces:\n  users: [{exclusive: true, regex: \"@f_.*\"}]\n"), 0o600)
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: []string{reg}})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	hs, err := harness.Start(ctx, bin, cfg, &out)
	if err == nil {
		hs.Kill()
		t.Fatal("dendrite-asdispatch started with a registration without url")
	}
	if s := out.String(); !strings.Contains(s, "registrations refused") || !strings.Contains(s, "forgot-url.yaml") {
		t.Errorf("output does not name the problem:\n%s", s)
	}
}
