// Package harness builds and runs dendrite-asdispatch and stock Dendrite
// for tests and the side-by-side benchmark: a generated Dendrite config
// (SQLite, loopback, open registration), the binaries cached under
// $HOME/.cache keyed by Dendrite's version and a hash of the sources, and a
// few client-server calls.
package harness

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/matrix-org/dendrite/setup/config"
	"golang.org/x/crypto/bcrypt"
	"gopkg.in/yaml.v2"
)

// DendriteVersion is the Dendrite release both binaries are built from
// (this module's go.mod).
const DendriteVersion = "v0.13.8"

// Binary names what Build builds.
type Binary string

const (
	// AsDispatch is this module's cmd/dendrite-asdispatch.
	AsDispatch Binary = "dendrite-asdispatch"
	// Stock is Dendrite's own cmd/dendrite, same version, same dependencies.
	Stock Binary = "dendrite"
)

// ModuleDir returns contrib/dendrite, found from the working directory.
func ModuleDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
			bytes.Contains(b, []byte("module github.com/matrix-org/dendrite/contrib/asdispatch\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("harness: not inside contrib/dendrite")
		}
		dir = parent
	}
}

// Build returns the path of the binary, building it only if no binary of
// the same sources is cached under $HOME/.cache/asdispatch. The key covers
// Dendrite's version, the Go version and every non-test source of this
// module (but the driver's: this package and cmd/dendrite-bench) and of the
// asdispatch library it links.
func Build(ctx context.Context, which Binary) (string, error) {
	mod, err := ModuleDir()
	if err != nil {
		return "", err
	}
	key, err := sourceKey(mod)
	if err != nil {
		return "", err
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(home, ".cache", "asdispatch")
	bin := filepath.Join(dir, fmt.Sprintf("%s-%s-%s", which, DendriteVersion, key[:16]))
	if which == Stock {
		// Stock Dendrite depends only on the module's dependency versions.
		h := sha256.New()
		fmt.Fprintln(h, DendriteVersion, runtime.Version())
		for _, f := range []string{"go.mod", "go.sum"} {
			b, err := os.ReadFile(filepath.Join(mod, f))
			if err != nil {
				return "", err
			}
			h.Write(b)
		}
		bin = filepath.Join(dir, fmt.Sprintf("%s-%s-%x", which, DendriteVersion, h.Sum(nil)[:8]))
	}
	if _, err := os.Stat(bin); err == nil {
		// Marks it used: pruneCache keeps what was used recently.
		now := time.Now()
		_ = os.Chtimes(bin, now, now)
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	pkg := "./cmd/dendrite-asdispatch"
	if which == Stock {
		pkg = "github.com/matrix-org/dendrite/cmd/dendrite"
	}
	tmp := bin + ".tmp" + fmt.Sprint(os.Getpid())
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, pkg)
	cmd.Dir = mod
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", pkg, err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", err
	}
	pruneCache(dir, which, bin, time.Now())
	return bin, nil
}

// Cached binaries are 64 MB each. Other source hashes may be other
// checkouts' (worktrees, a CI job next to a developer): a binary is
// removed only once it has gone unused for cacheMaxAge, a partial build
// (a .tmp of a killed build) after tmpMaxAge.
const (
	cacheMaxAge = 7 * 24 * time.Hour
	tmpMaxAge   = 24 * time.Hour
)

// pruneCache removes which's cached binaries but keep that were not used
// (built or returned by Build) within cacheMaxAge of now.
func pruneCache(dir string, which Binary, keep string, now time.Time) {
	old, _ := filepath.Glob(filepath.Join(dir, fmt.Sprintf("%s-%s-*", which, DendriteVersion)))
	for _, o := range old {
		fi, err := os.Stat(o)
		if o == keep || err != nil {
			continue
		}
		age := cacheMaxAge
		if strings.Contains(filepath.Base(o), ".tmp") {
			age = tmpMaxAge
		}
		if now.Sub(fi.ModTime()) > age {
			_ = os.Remove(o)
		}
	}
}

// sourceKey hashes what the asdispatch binary is built from.
func sourceKey(mod string) (string, error) {
	h := sha256.New()
	fmt.Fprintln(h, DendriteVersion, runtime.Version())
	root := filepath.Join(mod, "..", "..")
	walk := func(base string, skip func(string) bool) error {
		return filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if p != base && (skip(p) || strings.HasPrefix(d.Name(), ".")) {
					return filepath.SkipDir
				}
				return nil
			}
			n := d.Name()
			if (strings.HasSuffix(n, ".go") && !strings.HasSuffix(n, "_test.go")) || n == "go.mod" || n == "go.sum" {
				b, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				rel, _ := filepath.Rel(root, p)
				fmt.Fprintf(h, "%s %d\n", rel, len(b))
				h.Write(b)
			}
			return nil
		})
	}
	// The driver side (this package, the benchmark) is not linked into
	// the binary, nor is a directory with a go.mod of its own (the mautrix
	// test module): editing them rebuilds nothing.
	notLinked := []string{filepath.Join(mod, "internal", "harness"), filepath.Join(mod, "cmd", "dendrite-bench")}
	skip := func(p string) bool {
		if slices.Contains(notLinked, p) {
			return true
		}
		_, err := os.Stat(filepath.Join(p, "go.mod"))
		return err == nil
	}
	if err := walk(mod, skip); err != nil {
		return "", err
	}
	contrib, integ := filepath.Join(root, "contrib"), filepath.Join(root, "integration")
	if err := walk(root, func(p string) bool { return p == contrib || p == integ }); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Server is a running homeserver.
type Server struct {
	URL  string
	Dir  string
	Cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited
	err  error         // its exit error, valid once done is closed
}

// Stop sends SIGTERM and waits up to timeout for the process to exit; it
// returns the exit error, or an error if it did not exit (it is then
// killed).
func (s *Server) Stop(timeout time.Duration) error {
	_ = s.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return s.err
	case <-time.After(timeout):
		_ = s.Cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("did not exit within %s of SIGTERM", timeout)
	}
}

// Kill sends SIGKILL (unless it has exited) and waits for the process to
// be gone.
func (s *Server) Kill() {
	select {
	case <-s.done:
		return
	default:
	}
	_ = s.Cmd.Process.Kill()
	<-s.done
}

// Options shape the generated config.
type Options struct {
	// Registrations are the app_service_api.config_files.
	Registrations []string
	// AsDispatch is appended as the config's asdispatch section (YAML,
	// indented under it), e.g. "appservice:\n  retry_initial: 100ms\n".
	AsDispatch string
	// Metrics enables Dendrite's /metrics (basic auth metrics:metrics).
	Metrics bool
	// LogLevel is Dendrite's log level (default warn).
	LogLevel string
}

// WriteConfig writes a Dendrite config for a loopback test server in dir:
// one SQLite file per component, JetStream on disk, open registration, no
// rate limits, no federation key perspectives, logs to stderr at warn. It
// may be called again on the same dir (same data, same server key).
func WriteConfig(dir string, o Options) (string, error) {
	cfg := &config.Dendrite{Version: config.Version}
	cfg.Defaults(config.DefaultOpts{Generate: true, SingleDatabase: true})
	// SQLite cannot be shared between Dendrite's components: each gets a
	// file, which also lets a test look at one component's database.
	sqlite := func(component string) config.DataSource {
		return config.DataSource("file:" + filepath.Join(dir, component+".sqlite"))
	}
	cfg.RoomServer.Database.ConnectionString = sqlite("roomserver")
	cfg.SyncAPI.Database.ConnectionString = sqlite("syncapi")
	cfg.UserAPI.AccountDatabase.ConnectionString = sqlite("userapi")
	cfg.KeyServer.Database.ConnectionString = sqlite("keyserver")
	cfg.FederationAPI.Database.ConnectionString = sqlite("federationapi")
	cfg.RelayAPI.Database.ConnectionString = sqlite("relayapi")
	cfg.MediaAPI.Database.ConnectionString = sqlite("mediaapi")
	cfg.MSCs.Database.ConnectionString = sqlite("mscs")

	// A second config in the same dir (other registrations) keeps the
	// server's key: the rooms it signed stay verifiable.
	keyPath := filepath.Join(dir, "signing.pem")
	if _, err := os.Stat(keyPath); errors.Is(err, fs.ErrNotExist) {
		if err := writeSigningKey(keyPath); err != nil {
			return "", err
		}
	} else if err != nil {
		return "", err
	}
	cfg.Global.PrivateKeyPath = config.Path(keyPath)
	cfg.Global.JetStream.StoragePath = config.Path(filepath.Join(dir, "jetstream"))
	cfg.Global.ReportStats.Enabled = false
	cfg.Global.Metrics.Enabled = o.Metrics
	cfg.MediaAPI.BasePath = config.Path(filepath.Join(dir, "media"))
	cfg.SyncAPI.Fulltext.Enabled = false
	cfg.SyncAPI.Fulltext.IndexPath = config.Path(filepath.Join(dir, "fulltext"))
	level := o.LogLevel
	if level == "" {
		level = "warn"
	}
	cfg.Logging = []config.LogrusHook{{Type: "std", Level: level}}
	cfg.ClientAPI.RegistrationDisabled = false
	cfg.ClientAPI.OpenRegistrationWithoutVerificationEnabled = true
	cfg.ClientAPI.RateLimiting.Enabled = false
	cfg.FederationAPI.KeyPerspectives = nil // never ask matrix.org for keys
	cfg.UserAPI.BCryptCost = bcrypt.MinCost // registration in tests, not security
	cfg.AppServiceAPI.ConfigFiles = o.Registrations
	y, err := yaml.Marshal(cfg)
	if err != nil {
		return "", err
	}
	if o.AsDispatch != "" {
		y = append(y, "asdispatch:\n"...)
		for _, l := range strings.SplitAfter(strings.TrimRight(o.AsDispatch, "\n")+"\n", "\n") {
			if l != "" {
				y = append(y, "  "+l...)
			}
		}
	}
	path := filepath.Join(dir, "dendrite.yaml")
	return path, os.WriteFile(path, y, 0o600)
}

// writeSigningKey writes a fresh ed25519 server key as the PEM block
// Dendrite reads: type "MATRIX PRIVATE KEY", the seed as bytes, the key id
// in a Key-ID header.
func writeSigningKey(path string) error {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	var tag [3]byte
	if _, err := rand.Read(tag[:]); err != nil {
		return err
	}
	block := &pem.Block{
		Type:    "MATRIX PRIVATE KEY",
		Headers: map[string]string{"Key-ID": "ed25519:harness" + hex.EncodeToString(tag[:])},
		Bytes:   priv.Seed(),
	}
	return os.WriteFile(path, pem.EncodeToMemory(block), 0o600)
}

// Start runs bin with config in its directory on a free loopback port and
// waits up to 60 s until the client API answers.
func Start(ctx context.Context, bin, configPath string, stderr io.Writer) (*Server, error) {
	return StartWithin(ctx, bin, configPath, stderr, 60*time.Second)
}

// StartWithin is Start waiting up to within (start-up with 1,000
// registrations creates 1,000 accounts: over a minute on a loaded machine).
func StartWithin(ctx context.Context, bin, configPath string, stderr io.Writer, within time.Duration) (*Server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := filepath.Dir(configPath)
	cmd := exec.Command(bin, "-config", configPath, "-http-bind-address", addr, "-really-enable-open-registration")
	cmd.Dir = dir
	if stderr == nil {
		stderr = io.Discard
	}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &Server{URL: "http://" + addr, Dir: dir, Cmd: cmd, done: make(chan struct{})}
	go func() { s.err = cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get(s.URL + "/_matrix/client/versions")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return s, nil
			}
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("%s exited before answering: %v", filepath.Base(bin), s.err)
		case <-ctx.Done():
			s.Kill()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Kill()
			return nil, fmt.Errorf("%s did not answer within %s", filepath.Base(bin), within)
		}
	}
}

// Call makes one client-server call and decodes the JSON answer; a non-2xx
// status is an error carrying the body.
func Call(ctx context.Context, method, u, token string, body any) (map[string]any, error) {
	var rd io.Reader
	if body != nil {
		js, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(js)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	_ = json.Unmarshal(b, &out)
	if resp.StatusCode/100 != 2 {
		return out, &StatusError{Method: method, URL: u, Status: resp.StatusCode, Body: string(b)}
	}
	return out, nil
}

// StatusError is a non-2xx answer.
type StatusError struct {
	Method, URL string
	Status      int
	Body        string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%s %s: %d %s", e.Method, e.URL, e.Status, e.Body)
}

// Register creates a user with open registration (Dendrite's dummy
// user-interactive auth) and returns its access token.
func Register(ctx context.Context, hs, user, password string) (string, error) {
	u := hs + "/_matrix/client/v3/register"
	out, err := Call(ctx, "POST", u, "", map[string]any{"username": user, "password": password})
	var se *StatusError
	if err != nil && !(errors.As(err, &se) && se.Status == 401) {
		return "", err
	}
	if err != nil {
		session, _ := out["session"].(string)
		out, err = Call(ctx, "POST", u, "", map[string]any{"username": user, "password": password,
			"auth": map[string]any{"type": "m.login.dummy", "session": session}})
		if err != nil {
			return "", err
		}
	}
	tok, _ := out["access_token"].(string)
	if tok == "" {
		return "", fmt.Errorf("register %s: no access_token in %v", user, out)
	}
	return tok, nil
}
