// Command dendrite-asdispatch runs Dendrite (v0.13.8, linked as a library,
// Apache-2.0) as a single process with asdispatch serving the application
// services: every other component is built by Dendrite's own constructors,
// the appservice one is asdendrite.
//
// Usage:
//
//	dendrite-asdispatch -config dendrite.yaml [-http-bind-address :8008]
//
// Dendrite reads the config file as usual; asdispatch reads its own
// "asdispatch:" section of the same file and re-validates the registration
// files listed under app_service_api.config_files.
//
// The import path lies under github.com/matrix-org/dendrite because only
// packages there may import the internal packages (sqlutil, caching,
// httputil) the components' constructors take.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	appserviceAPI "github.com/matrix-org/dendrite/appservice/api"
	"github.com/matrix-org/dendrite/federationapi"
	dinternal "github.com/matrix-org/dendrite/internal"
	"github.com/matrix-org/dendrite/internal/caching"
	"github.com/matrix-org/dendrite/internal/httputil"
	"github.com/matrix-org/dendrite/internal/sqlutil"
	"github.com/matrix-org/dendrite/roomserver"
	rsapi "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/dendrite/setup"
	"github.com/matrix-org/dendrite/setup/base"
	"github.com/matrix-org/dendrite/setup/config"
	"github.com/matrix-org/dendrite/setup/jetstream"
	"github.com/matrix-org/dendrite/setup/mscs"
	"github.com/matrix-org/dendrite/setup/process"
	"github.com/matrix-org/dendrite/userapi"
	"github.com/matrix-org/gomatrixserverlib/fclient"
	"github.com/matrix-org/gomatrixserverlib/spec"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/matrix-org/dendrite/contrib/asdispatch/asdendrite"
)

// closeTimeout bounds how long the dispatcher may take to flush on shutdown.
const closeTimeout = 10 * time.Second

func main() {
	opts, err := parseOptions(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dendrite-asdispatch:", err)
		os.Exit(2)
	}
	if opts.version {
		fmt.Println(dinternal.VersionString())
		return
	}
	if err := run(opts); err != nil {
		// Dendrite's components log through logrus; our start-up errors
		// go to the same place so that one log holds both.
		logrus.Fatalf("dendrite-asdispatch: %s", err)
	}
}

// options are the command line; everything else comes from the config file.
type options struct {
	configPath       string
	listen           config.ServerAddress
	openRegistration bool
	version          bool
}

func parseOptions(args []string, out io.Writer) (options, error) {
	fs := flag.NewFlagSet("dendrite-asdispatch", flag.ContinueOnError)
	fs.SetOutput(out)
	var o options
	fs.StringVar(&o.configPath, "config", "dendrite.yaml", "Dendrite config file, with an optional asdispatch: section")
	listen := fs.String("http-bind-address", ":8008", "host:port the client, federation and admin APIs listen on (plain HTTP)")
	fs.BoolVar(&o.openRegistration, "really-enable-open-registration", false, "allow registration without a captcha or token (tests only)")
	fs.BoolVar(&o.version, "version", false, "print Dendrite's version and exit")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.configPath == "" {
		return o, errors.New("-config is empty")
	}
	addr, err := config.HTTPAddress("http://" + *listen)
	if err != nil {
		return o, fmt.Errorf("-http-bind-address %q: %w", *listen, err)
	}
	o.listen = addr
	return o, nil
}

// loadConfig reads and checks Dendrite's config, then our view of the same
// file: the registrations as asdispatch's registry sees them and the
// asdispatch section.
func loadConfig(o options) (*config.Dendrite, *registry.Set, asdendrite.Settings, error) {
	cfg, err := config.Load(o.configPath)
	if err != nil {
		return nil, nil, asdendrite.Settings{}, fmt.Errorf("config %s: %w", o.configPath, err)
	}
	if o.openRegistration {
		cfg.ClientAPI.OpenRegistrationWithoutVerificationEnabled = true
	}
	var problems config.ConfigErrors
	cfg.Verify(&problems)
	if len(problems) > 0 {
		return nil, nil, asdendrite.Settings{}, fmt.Errorf("config %s: %d problem(s): %v", o.configPath, len(problems), []string(problems))
	}
	regs, warnings, err := asdendrite.LoadRegistrations(cfg)
	if err != nil {
		return nil, nil, asdendrite.Settings{}, fmt.Errorf("registrations refused: %w", err)
	}
	for _, w := range warnings {
		logrus.Warnf("asdispatch registration warning: %s", w)
	}
	settings, err := asdendrite.LoadSettings(o.configPath)
	if err != nil {
		return nil, nil, asdendrite.Settings{}, err
	}
	return cfg, regs, settings, nil
}

func run(o options) error {
	cfg, regs, settings, err := loadConfig(o)
	if err != nil {
		return err
	}
	dinternal.SetupStdLogging()
	dinternal.SetupHookLogging(cfg.Logging)
	base.PlatformSanityChecks() // raises the file-descriptor limit
	logrus.Infof("dendrite-asdispatch: Dendrite %s", dinternal.VersionString())

	zlog, err := zap.NewProduction()
	if err != nil {
		return fmt.Errorf("zap logger: %w", err)
	}
	defer zlog.Sync() //nolint:errcheck // stderr may not sync

	pctx := process.NewProcessContext()
	if err := assemble(pctx, cfg, regs, settings, zlog, o.listen); err != nil {
		return err
	}
	// Blocks until SIGINT/SIGTERM, then stops every component that
	// registered with pctx, ours included.
	base.WaitForShutdown(pctx)
	return nil
}

// assemble builds Dendrite's components in dependency order, with asdendrite
// as the appservice API, and starts serving HTTP in the background.
func assemble(pctx *process.ProcessContext, cfg *config.Dendrite, regs *registry.Set, settings asdendrite.Settings, zlog *zap.Logger, listen config.ServerAddress) error {
	var dns *fclient.DNSCache
	if c := cfg.Global.DNSCache; c.Enabled {
		dns = fclient.NewDNSCache(c.CacheSize, c.CacheLifetime)
	}
	fedClient := base.CreateFederationClient(cfg, dns)
	conns := sqlutil.NewConnectionManager(pctx, cfg.Global.DatabaseOptions)
	caches := caching.NewRistrettoCache(cfg.Global.Cache.EstimatedMaxSize, cfg.Global.Cache.MaxAge, caching.EnableMetrics)
	nats := &jetstream.NATSInstance{}

	rs := roomserver.NewInternalAPI(pctx, cfg, conns, nats, caches, caching.EnableMetrics)
	fed := federationapi.NewInternalAPI(pctx, cfg, conns, nats, fedClient, rs, caches, nil, false)
	rs.SetFederationAPI(fed, fed.KeyRing())
	users := userapi.NewInternalAPI(pctx, cfg, conns, nats, rs, fedClient, caching.EnableMetrics, fed.IsBlacklistedOrBackingOff)

	as, err := startAppservices(pctx, cfg, nats, regs, settings, zlog, users, rs)
	if err != nil {
		return err
	}
	rs.SetAppserviceAPI(as)
	rs.SetUserAPI(users)

	m := setup.Monolith{
		Config:        cfg,
		Client:        base.CreateClient(cfg, dns),
		FedClient:     fedClient,
		KeyRing:       fed.KeyRing(),
		AppserviceAPI: as,
		FederationAPI: fed,
		// The client API changes aliases and creates rooms through this
		// value: wrapping it lets asdispatch drop its cached interest.
		RoomserverAPI: asdendrite.AliasWatcher{RoomserverInternalAPI: rs, Invalidate: as.Dispatcher().InvalidateRoom,
			// The spec's user query is for "an event for an unknown user ID
			// in the application service's namespace, such as a room
			// invite", and Synapse asks it then; Dendrite v0.13.8 asks only
			// on profile lookups. Its profile helper asks (local profile
			// first, then the owning ASes); the answer does not decide the
			// invite, Dendrite invites unknown local users anyway.
			BeforeInvite: func(ctx context.Context, invitee spec.UserID) {
				if cfg.Global.IsLocalServerName(invitee.Domain()) {
					_, _ = appserviceAPI.RetrieveUserProfile(ctx, invitee.String(), as, users)
				}
			}},
		UserAPI: users,
	}
	routers := httputil.NewRouters()
	m.AddAllPublicRoutes(pctx, cfg, routers, conns, nats, caches, caching.EnableMetrics)
	routers.Client.Handle(asdendrite.PingPath, as.PingHandler()).Methods(http.MethodPost)
	if len(cfg.MSCs.MSCs) > 0 {
		if err := mscs.Enable(cfg, conns, routers, &m, caches); err != nil {
			return fmt.Errorf("experimental MSCs %v: %w", cfg.MSCs.MSCs, err)
		}
	}
	// Stock Dendrite's liveness metric, so that its dashboards and alerts
	// keep working with this binary.
	up := prometheus.NewCounter(prometheus.CounterOpts{Name: "dendrite_up",
		ConstLabels: prometheus.Labels{"version": dinternal.VersionString()}})
	up.Inc()
	if err := prometheus.DefaultRegisterer.Register(up); err != nil {
		return fmt.Errorf("metric dendrite_up: %w", err)
	}
	go base.SetupAndServeHTTP(pctx, cfg, routers, listen, nil, nil)
	return nil
}

// startAppservices is the one component that differs from stock Dendrite:
// asdispatch's dispatcher fed by one JetStream consumer, closed when
// Dendrite shuts down.
func startAppservices(pctx *process.ProcessContext, cfg *config.Dendrite, nats *jetstream.NATSInstance, regs *registry.Set, settings asdendrite.Settings, zlog *zap.Logger, users asdendrite.UserAPI, rs rsapi.AppserviceRoomserverAPI) (*asdendrite.API, error) {
	var mx *metrics.Metrics
	if cfg.Global.Metrics.Enabled {
		// Dendrite serves prometheus.DefaultRegisterer on /metrics.
		mx = metrics.New(prometheus.DefaultRegisterer)
	}
	as, err := asdendrite.New(pctx.Context(), asdendrite.Config{
		Dendrite: cfg, Settings: settings, Registry: registry.NewRegistry(regs),
		UserAPI: users, RSAPI: rs, Logger: zlog, Metrics: mx,
	})
	if err != nil {
		return nil, err
	}
	js, _ := nats.Prepare(pctx, &cfg.Global.JetStream)
	if err := as.Start(pctx.Context(), js, &cfg.Global.JetStream); err != nil {
		return nil, fmt.Errorf("asdispatch consumer: %w", err)
	}
	pctx.ComponentStarted()
	go func() {
		defer pctx.ComponentFinished()
		<-pctx.WaitForShutdown()
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if err := as.Close(ctx); err != nil {
			zlog.Error("asdispatch close", zap.Error(err))
		}
	}()
	return as, nil
}
