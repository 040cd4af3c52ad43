package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"gopkg.in/yaml.v3"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/asdispatch/asdispatch/homeserver"
	"github.com/asdispatch/asdispatch/logging"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// serveConfig is homeserver.yaml, Synapse-style.
type serveConfig struct {
	ServerName            string      `yaml:"server_name"`
	Listen                string      `yaml:"listen"`
	DataDir               string      `yaml:"data_dir"`
	AppServiceConfigFiles configFiles `yaml:"app_service_config_files"`
	LogLevel              string      `yaml:"log_level"`
	// AdminListen is where the operator endpoints (/_asdispatch/v1/...)
	// and /metrics are served, apart from the client API (default
	// 127.0.0.1:0: loopback, a free port, printed at start).
	AdminListen string `yaml:"admin_listen"`
	// AdminToken, if set, must be sent as "Authorization: Bearer <token>"
	// to every admin endpoint and /metrics. Never logged.
	AdminToken string `yaml:"admin_token"`
	// MaxUploadBytes bounds a media upload (default 50 MiB).
	MaxUploadBytes int64 `yaml:"max_upload_bytes"`
	Database       struct {
		// Backend is sqlite (default: dispatcher.db in data_dir) or
		// postgres: one database several serve processes share.
		Backend string `yaml:"backend"`
		// DSN is the PostgreSQL connection string (libpq URL or key=value;
		// search_path picks the schema). Never logged: it may hold a password.
		DSN string `yaml:"dsn"`
		// LeaseTTL is how long a process that stopped renewing keeps
		// sending for an AS before another takes over (default 10s).
		LeaseTTL time.Duration `yaml:"lease_ttl"`
	} `yaml:"database"`
	AppService struct {
		RetryInitial    time.Duration `yaml:"retry_initial"`
		RetryMax        time.Duration `yaml:"retry_max"`
		MaxEventsPerTxn int           `yaml:"max_events_per_txn"`
		MaxTxnBytes     int           `yaml:"max_txn_bytes"`
		// CatchupMaxEventsPerTxn lets the transactions of an AS with a
		// backlog grow to that many events, max_txn_bytes still capping
		// them (default 0: off).
		CatchupMaxEventsPerTxn int           `yaml:"catchup_max_events_per_txn"`
		QueryTimeout           time.Duration `yaml:"query_timeout"`
		// TxnTimeout bounds one transaction (default 90s; mautrix-go
		// handles a transaction before it answers).
		TxnTimeout time.Duration `yaml:"txn_timeout"`
		// Websocket accepts appservice websockets on the client listener
		// (default true; docs/websocket.md): bridges with no open port
		// dial in, and `url: null` ASes get their events over the socket.
		Websocket *bool `yaml:"websocket"`
		// WebsocketPingInterval is how often an open socket is pinged
		// (default 30s).
		WebsocketPingInterval time.Duration `yaml:"websocket_ping_interval"`
	} `yaml:"appservice"`
}

// configFiles is app_service_config_files: a list of paths, as Synapse
// requires. yaml.v3 alone would take `- 1` as "1" and name no key for a
// string or a number, so the value is checked here, naming the key.
type configFiles []string

// UnmarshalYAML implements yaml.Unmarshaler.
func (c *configFiles) UnmarshalYAML(n *yaml.Node) error {
	const key = "app_service_config_files"
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		*c = nil
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		return fmt.Errorf("line %d: %s must be a list of registration file paths, got %s", n.Line, key, describeNode(n))
	}
	files := make(configFiles, 0, len(n.Content))
	for i, item := range n.Content {
		if !registry.IsYAMLString(item) {
			return fmt.Errorf("line %d: %s[%d] must be a file path (a string), got %s", item.Line, key, i, describeNode(item))
		}
		files = append(files, item.Value)
	}
	*c = files
	return nil
}

func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "a mapping"
	case yaml.AliasNode:
		return "an alias"
	}
	switch {
	case registry.IsYAMLString(n):
		return fmt.Sprintf("the string %q", n.Value)
	case n.ShortTag() == "!!null":
		return "null"
	}
	return n.Value + " (not a string in YAML; quote it)"
}

// reload validates the registrations again and swaps them in as a whole;
// an invalid set is refused and the running one stays.
func reload(ctx context.Context, cfg serveConfig, hs *homeserver.Server, log *zap.Logger) {
	set, warns, err := registry.Load(cfg.ServerName, cfg.AppServiceConfigFiles...)
	for _, w := range warns {
		log.Warn("registration: " + w.String())
	}
	if err != nil {
		log.Error("reload refused: the registrations are invalid; the running set stays", zap.Error(err))
		return
	}
	if err := hs.Reload(ctx, set); err != nil {
		log.Error("reload failed", zap.Error(err))
		return
	}
	log.Info("registrations reloaded", zap.Int("appservices", set.Len()))
}

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "homeserver.yaml")
	cfg := serveConfig{ServerName: "localhost", Listen: "127.0.0.1:8008", AdminListen: "127.0.0.1:0", DataDir: "asdispatch-data", LogLevel: "info"}
	var files stringList
	fs.StringVar(&cfg.ServerName, "server-name", cfg.ServerName, "server_name")
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "host:port to listen on (port 0 picks one)")
	fs.StringVar(&cfg.AdminListen, "admin-listen", cfg.AdminListen, "host:port of the admin endpoints and /metrics")
	fs.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "directory of the SQLite files (created if missing)")
	fs.Var(&files, "appservice", "a registration file or directory (repeatable)")
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	explicit := map[string]string{}
	fs.Visit(func(f *flag.Flag) {
		if f.Name != "config" && f.Name != "appservice" {
			explicit[f.Name] = f.Value.String()
		}
	})
	if *cfgPath != "" {
		data, err := os.ReadFile(*cfgPath)
		if err != nil {
			fmt.Fprintf(stderr, "asdispatch serve: %v\n", err)
			return 1
		}
		if err := yaml.Unmarshal(data, &cfg); err != nil {
			fmt.Fprintf(stderr, "asdispatch serve: %s: %v\n", *cfgPath, err)
			return 1
		}
		// Flags given explicitly win over the file.
		for name, v := range explicit {
			_ = fs.Set(name, v)
		}
	}
	cfg.AppServiceConfigFiles = append(cfg.AppServiceConfigFiles, files...)
	log, err := logging.New(cfg.LogLevel, false)
	if err != nil {
		fmt.Fprintf(stderr, "asdispatch serve: %v\n", err)
		return 2
	}
	defer log.Sync()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := serve(ctx, cfg, log, stdout, nil); err != nil {
		fmt.Fprintf(stderr, "asdispatch serve: %v\n", err)
		return 1
	}
	return 0
}

// serveFaults, set only in a binary built with the asdispatch_faults tag
// (faults.go), installs test fault points from the environment.
var serveFaults func(*homeserver.Config)

// storeOpener returns how to open the dispatcher's store: nil for SQLite in
// data_dir.
func storeOpener(cfg serveConfig) (func(context.Context, txnstore.Options) (txnstore.Store, error), error) {
	switch cfg.Database.Backend {
	case "", "sqlite":
		return nil, nil
	case "postgres", "postgresql":
		if cfg.Database.DSN == "" {
			return nil, errors.New("database: backend postgres needs a dsn")
		}
		dsn := cfg.Database.DSN
		return func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			return txnstore.OpenPostgres(ctx, dsn, opts)
		}, nil
	default:
		return nil, fmt.Errorf("database: unknown backend %q (sqlite or postgres)", cfg.Database.Backend)
	}
}

// checkTxnCaps checks the transaction caps of the appservice section (0:
// the default).
func checkTxnCaps(maxEvents, maxBytes, catchupMaxEvents int) error {
	events := maxEvents
	if events == 0 {
		events = 100
	}
	switch {
	case maxEvents < 0:
		return fmt.Errorf("max_events_per_txn must not be negative, got %d", maxEvents)
	case maxBytes < 0:
		return fmt.Errorf("max_txn_bytes must not be negative, got %d", maxBytes)
	case catchupMaxEvents < 0:
		return fmt.Errorf("catchup_max_events_per_txn must not be negative (0 turns it off), got %d", catchupMaxEvents)
	case catchupMaxEvents > 0 && catchupMaxEvents < events:
		return fmt.Errorf("catchup_max_events_per_txn (%d) must be 0 (off) or at least max_events_per_txn (%d)", catchupMaxEvents, events)
	}
	return nil
}

type stringList []string

func (l *stringList) String() string     { return fmt.Sprint(*l) }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// serve runs the stub homeserver until ctx ends. ready, if set, gets the
// listening address.
func serve(ctx context.Context, cfg serveConfig, log *zap.Logger, stdout io.Writer, ready chan<- string) error {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return err
	}
	set, warns, err := registry.Load(cfg.ServerName, cfg.AppServiceConfigFiles...)
	for _, w := range warns {
		log.Warn("registration: " + w.String())
	}
	if err != nil {
		return err
	}
	if err := checkTxnCaps(cfg.AppService.MaxEventsPerTxn, cfg.AppService.MaxTxnBytes, cfg.AppService.CatchupMaxEventsPerTxn); err != nil {
		return fmt.Errorf("appservice: %w", err)
	}
	openStore, err := storeOpener(cfg)
	if err != nil {
		return err
	}
	promReg := prometheus.NewRegistry()
	promReg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	hcfg := homeserver.Config{
		ServerName: cfg.ServerName, DataDir: cfg.DataDir, Registry: registry.NewRegistry(set), Logger: log,
		Metrics:               metrics.New(promReg),
		MaxUploadBytes:        cfg.MaxUploadBytes,
		QueryTimeout:          cfg.AppService.QueryTimeout,
		TxnTimeout:            cfg.AppService.TxnTimeout,
		OpenStore:             openStore,
		Websocket:             cfg.AppService.Websocket == nil || *cfg.AppService.Websocket,
		WebsocketPingInterval: cfg.AppService.WebsocketPingInterval,
		Queue: queue.Options{RetryInitial: cfg.AppService.RetryInitial, RetryMax: cfg.AppService.RetryMax,
			MaxEvents: cfg.AppService.MaxEventsPerTxn, MaxBytes: cfg.AppService.MaxTxnBytes,
			CatchupMaxEvents: cfg.AppService.CatchupMaxEventsPerTxn, Logger: log,
			LeaseTTL: cfg.Database.LeaseTTL},
	}
	if serveFaults != nil {
		serveFaults(&hcfg)
	}
	hs, err := homeserver.New(ctx, hcfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		hs.Close(context.Background())
		return err
	}
	adminAddr := cfg.AdminListen
	if adminAddr == "" {
		adminAddr = "127.0.0.1:0"
	}
	adminLn, err := net.Listen("tcp", adminAddr)
	if err != nil {
		ln.Close()
		hs.Close(context.Background())
		return fmt.Errorf("admin_listen: %w", err)
	}
	fmt.Fprintf(stdout, "listening on http://%s\n", ln.Addr())
	fmt.Fprintf(stdout, "admin listening on http://%s\n", adminLn.Addr())
	if ready != nil {
		ready <- ln.Addr().String()
	}
	admin := http.NewServeMux()
	admin.Handle("GET /metrics", promhttp.HandlerFor(promReg, promhttp.HandlerOpts{}))
	admin.Handle("/", hs.AdminHandler())
	srv := &http.Server{Handler: hs, ReadHeaderTimeout: 10 * time.Second}
	adminSrv := &http.Server{Handler: requireToken(cfg.AdminToken, admin), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ln) }()
	go func() { errc <- adminSrv.Serve(adminLn) }()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
loop:
	for {
		select {
		case err = <-errc:
			break loop
		case <-ctx.Done():
			break loop
		case <-hup:
			reload(ctx, cfg, hs, log)
		}
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdown)
	_ = adminSrv.Shutdown(shutdown)
	if cerr := hs.Close(shutdown); cerr != nil && !errors.Is(cerr, context.DeadlineExceeded) {
		log.Warn("closing the dispatcher: " + cerr.Error())
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

func writeAdminError(w http.ResponseWriter, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusUnauthorized)
	fmt.Fprintf(w, `{"errcode":%q,"error":%q}`, code, msg)
}

// requireToken lets a request through only with "Authorization: Bearer
// token" (compared in constant time); an empty token lets everything
// through.
func requireToken(token string, next http.Handler) http.Handler {
	if token == "" {
		return next
	}
	want := sha256.Sum256([]byte(token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(got))
		if !ok || got == "" {
			// As the client-server API answers a request without a token.
			writeAdminError(w, "M_MISSING_TOKEN", "admin token required")
			return
		}
		if subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			writeAdminError(w, "M_UNKNOWN_TOKEN", "unknown admin token")
			return
		}
		next.ServeHTTP(w, r)
	})
}
