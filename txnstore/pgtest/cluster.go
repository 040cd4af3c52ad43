package pgtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Cluster is a PostgreSQL cluster a test owns: made with initdb in the
// test's temporary directory, listening on a free port of 127.0.0.1, and
// stopped when the test ends. Stop and Start take it down and up again
// (an outage), keeping its data and port.
type Cluster struct {
	t    testing.TB
	bin  string
	data string
	port int
	cred *syscall.Credential
}

// NewCluster makes and starts a cluster. Without PostgreSQL's server
// binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin or on PATH)
// the test is skipped, unless CI is set: then it fails. PostgreSQL refuses
// to run as root, so as root the cluster runs as the user postgres.
func NewCluster(t testing.TB) *Cluster {
	t.Helper()
	bin := serverBinaries()
	if bin == "" {
		if os.Getenv("CI") == "" {
			t.Skip("PostgreSQL server binaries (initdb, pg_ctl) not found; set CI=1 to make this a failure")
		}
		t.Fatal("PostgreSQL server binaries (initdb, pg_ctl) not found and CI is set")
	}
	dir := t.TempDir()
	c := &Cluster{t: t, bin: bin, data: filepath.Join(dir, "data")}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("pgtest: running as root and there is no user postgres to run the cluster as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		// t.TempDir and its parent are root's, mode 0700.
		for _, d := range []string{filepath.Dir(dir), dir} {
			if err := os.Chown(d, uid, gid); err != nil {
				t.Fatalf("pgtest: %v", err)
			}
		}
	}
	c.port = freePort(t)
	c.run("initdb", "-D", c.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
	c.Start()
	t.Cleanup(func() {
		if c.running() {
			c.pgctl("stop", "-m", "immediate")
		}
	})
	return c
}

// DSN is the cluster's database postgres.
func (c *Cluster) DSN() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
}

// Start starts the cluster and waits until it takes connections.
func (c *Cluster) Start() {
	c.t.Helper()
	// fsync off: the outages are processes stopping, not the machine.
	c.pgctl("start", "-w", "-t", "60", "-l", filepath.Join(filepath.Dir(c.data), "postgres.log"),
		"-o", fmt.Sprintf("-p %d -c listen_addresses=127.0.0.1 -k %s -c fsync=off -c max_connections=50", c.port, filepath.Dir(c.data)))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, c.DSN())
		if err == nil {
			conn.Close(ctx)
			return
		}
		if ctx.Err() != nil {
			c.t.Fatalf("pgtest: the cluster does not take connections: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the cluster at once, as a crash would (pg_ctl -m immediate):
// connections drop, and the next Start recovers from the WAL.
func (c *Cluster) Stop() {
	c.t.Helper()
	c.pgctl("stop", "-w", "-m", "immediate")
}

func (c *Cluster) running() bool {
	cmd := exec.Command(filepath.Join(c.bin, "pg_ctl"), "status", "-D", c.data)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	return cmd.Run() == nil
}

func (c *Cluster) pgctl(args ...string) {
	c.t.Helper()
	c.run("pg_ctl", append([]string{"-D", c.data}, args...)...)
}

func (c *Cluster) run(name string, args ...string) {
	c.t.Helper()
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	// Not the test's environment: PG* variables would redirect the tools.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LANG=C", "LC_ALL=C"}
	cmd.Dir = filepath.Dir(c.data)
	if out, err := cmd.CombinedOutput(); err != nil {
		c.t.Fatalf("pgtest: %s %v: %v\n%s", name, args, err, out)
	}
}

// serverBinaries is the directory of initdb and pg_ctl: the newest
// /usr/lib/postgresql/<version>/bin, else PATH's; "" if none.
func serverBinaries() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return vb - va
	})
	for _, d := range dirs {
		if isExec(filepath.Join(d, "initdb")) && isExec(filepath.Join(d, "pg_ctl")) {
			return d
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		d := filepath.Dir(p)
		if isExec(filepath.Join(d, "pg_ctl")) {
			return d
		}
	}
	return ""
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
