package asdendrite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	appserviceAPI "github.com/matrix-org/dendrite/appservice/api"
	roomserverAPI "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/dendrite/setup/config"
	userapi "github.com/matrix-org/dendrite/userapi/api"
	"github.com/matrix-org/gomatrixserverlib/spec"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/queries"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Config is what New needs from the monolith.
type Config struct {
	Dendrite *config.Dendrite
	Settings Settings
	// Registry holds the registrations of Dendrite's
	// app_service_api.config_files, loaded by LoadRegistrations.
	Registry *registry.Registry
	UserAPI  UserAPI
	RSAPI    roomserverAPI.AppserviceRoomserverAPI
	Logger   *zap.Logger
	// Metrics, if set, records ours (on Dendrite's registry when its
	// metrics endpoint is enabled).
	Metrics *metrics.Metrics
}

// UserAPI is what New needs of Dendrite's user API: the appservice part
// (accounts, devices) and the access-token lookup that tells whether a
// sender's device is already in place.
type UserAPI interface {
	userapi.AppserviceUserAPI
	QueryAccessToken(ctx context.Context, req *userapi.QueryAccessTokenRequest, res *userapi.QueryAccessTokenResponse) error
}

// accountWorkers is how many sender accounts are created at a time: each
// creation waits on SQLite and JetStream writes (fsyncs) more than on CPU.
const accountWorkers = 8

// API implements Dendrite's AppServiceInternalAPI with asdispatch.
type API struct {
	d     *dispatcher.Dispatcher
	q     *queries.Service
	log   *zap.Logger
	rsAPI roomserverAPI.AppserviceRoomserverAPI
	// stream names the positions of the consumed JetStream stream (set by
	// Start; empty hands events over without a position).
	stream string
	reg    *registry.Registry
	// seen drops the copies Dendrite publishes of events handed over
	// already; handed is the last sequence of stream handed over.
	seen   *seenStore
	handed int64
	// floor: messages at or below it were in the JetStream stream when
	// stream's epoch began, all handed over in earlier epochs (see Start).
	floor uint64
	// past caches how far earlier position streams were handed over
	// (final: nothing is handed over under their names any more).
	past map[string]int64
}

var _ appserviceAPI.AppServiceInternalAPI = (*API)(nil)

// LoadRegistrations validates Dendrite's app_service_api.config_files with
// asdispatch's registry, which refuses what Dendrite lets through (a missing
// url key, lookaround in a regex, a duplicate as_token, ...). The error
// names the file and the problem.
func LoadRegistrations(cfg *config.Dendrite) (*registry.Set, []registry.Warning, error) {
	files := cfg.AppServiceAPI.ConfigFiles
	set, warnings, err := registry.Load(string(cfg.Global.ServerName), files...)
	if err != nil {
		return nil, warnings, fmt.Errorf("app_service_api.config_files: %w", err)
	}
	return set, warnings, nil
}

// New opens the dispatcher and creates each AS's sender account as Dendrite
// does. Start the event consumer with Start once JetStream is up.
func New(ctx context.Context, cfg Config) (*API, error) {
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	a := &API{log: log, rsAPI: cfg.RSAPI, reg: cfg.Registry}
	st := cfg.Settings.AppService
	client := asapi.New(asapi.Options{QueryTimeout: st.QueryTimeout, Logger: log})
	dcfg := dispatcher.Config{
		Registry:  cfg.Registry,
		DataDir:   cfg.Settings.DataDir,
		RoomState: roomState{rs: cfg.RSAPI, global: &cfg.Dendrite.Global},
		Logger:    log,
		Metrics:   cfg.Metrics,
		Queue: queue.Options{RetryInitial: st.RetryInitial, RetryMax: st.RetryMax,
			MaxEvents: st.MaxEventsPerTxn, MaxBytes: st.MaxTxnBytes, CatchupMaxEvents: st.CatchupMaxEventsPerTxn,
			Client: client, Logger: log},
	}
	if dsn := cfg.Settings.PostgresDSN; dsn != "" {
		dcfg.OpenStore = func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			return txnstore.OpenPostgres(ctx, dsn, opts)
		}
	}
	t0 := time.Now()
	d, err := dispatcher.New(ctx, dcfg)
	if err != nil {
		return nil, fmt.Errorf("asdispatch: %w", err)
	}
	a.d = d
	if err := os.MkdirAll(cfg.Settings.DataDir, 0o700); err != nil {
		_ = d.Close(ctx)
		return nil, fmt.Errorf("asdispatch: %w", err)
	}
	if a.seen, err = openSeen(ctx, filepath.Join(cfg.Settings.DataDir, "dendrite-seen.db")); err != nil {
		_ = d.Close(ctx)
		return nil, fmt.Errorf("asdispatch: %w", err)
	}
	a.q = queries.New(queries.Config{Registry: cfg.Registry, Client: client, Wake: d.Wake,
		Logger: log, Metrics: cfg.Metrics})
	all := cfg.Registry.Current().All()
	log.Info("dispatcher open", zap.Int("appservices", len(all)), zap.Duration("took", time.Since(t0)))
	t0 = time.Now()
	created, err := senderAccounts(ctx, cfg.UserAPI, all, cfg.Dendrite.Global.ServerName)
	if err != nil {
		_ = a.Close(ctx)
		return nil, fmt.Errorf("asdispatch: %w", err)
	}
	log.Info("sender accounts ready", zap.Int("appservices", len(all)), zap.Int("created", created),
		zap.Duration("took", time.Since(t0)))
	return a, nil
}

// Dispatcher is the dispatcher behind the API (status, reload).
func (a *API) Dispatcher() *dispatcher.Dispatcher { return a.d }

// Close stops the dispatcher; what is queued stays queued.
func (a *API) Close(ctx context.Context) error {
	err := a.d.Close(ctx)
	if a.seen != nil {
		err = errors.Join(err, a.seen.close())
	}
	return err
}

// senderAccounts puts each AS's sender account and device in place,
// accountWorkers at a time, and returns how many it had to create.
func senderAccounts(ctx context.Context, u UserAPI, all []*registry.AppService, server spec.ServerName) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan *registry.AppService)
	var mu sync.Mutex
	var firstErr error
	created := 0
	var wg sync.WaitGroup
	for range min(accountWorkers, len(all)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for as := range next {
				made, err := senderAccount(ctx, u, as, server)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("sender account of appservice %q: %w", as.ID, err)
					cancel()
				}
				if made {
					created++
				}
				mu.Unlock()
			}
		}()
	}
	for _, as := range all {
		select {
		case next <- as:
		case <-ctx.Done():
		}
	}
	close(next)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return created, firstErr
}

// senderAccount puts the AS's sender account and device in place unless
// they are: Dendrite's appservice component writes both at every start-up
// (two writes with fsyncs per AS, 40 s for 1,000 ASes on a loaded
// machine), the end state is the same.
func senderAccount(ctx context.Context, u UserAPI, as *registry.AppService, server spec.ServerName) (bool, error) {
	var q userapi.QueryAccessTokenResponse
	if err := u.QueryAccessToken(ctx, &userapi.QueryAccessTokenRequest{AccessToken: as.ASToken.Reveal()}, &q); err != nil {
		return false, err
	}
	if d := q.Device; d != nil && d.ID == as.SenderLocalpart &&
		d.UserID == fmt.Sprintf("@%s:%s", as.SenderLocalpart, server) && d.AccountType == userapi.AccountTypeAppService {
		return false, nil
	}
	return true, createSenderAccount(ctx, u, as, server)
}

// createSenderAccount creates the AS's sender_localpart user with the
// as_token as the access token of a device named after it, as Dendrite's
// appservice component does at start-up (idempotent: ConflictUpdate).
func createSenderAccount(ctx context.Context, u userapi.AppserviceUserAPI, as *registry.AppService, server spec.ServerName) error {
	var accRes userapi.PerformAccountCreationResponse
	if err := u.PerformAccountCreation(ctx, &userapi.PerformAccountCreationRequest{
		AccountType:  userapi.AccountTypeAppService,
		Localpart:    as.SenderLocalpart,
		ServerName:   server,
		AppServiceID: as.ID,
		OnConflict:   userapi.ConflictUpdate,
	}, &accRes); err != nil {
		return err
	}
	local := as.SenderLocalpart
	var devRes userapi.PerformDeviceCreationResponse
	return u.PerformDeviceCreation(ctx, &userapi.PerformDeviceCreationRequest{
		Localpart:          local,
		ServerName:         server,
		AccessToken:        as.ASToken.Reveal(), // Dendrite stores it as the device's access token
		DeviceID:           &local,
		DeviceDisplayName:  &local,
		NoDeviceListUpdate: true,
	}, &devRes)
}

// RoomAliasExists asks the ASes whose alias namespaces cover the alias.
func (a *API) RoomAliasExists(ctx context.Context, req *appserviceAPI.RoomAliasExistsRequest, resp *appserviceAPI.RoomAliasExistsResponse) error {
	r, err := a.q.QueryAlias(ctx, req.Alias)
	if err != nil {
		return err
	}
	resp.AliasExists = r.Exists
	return nil
}

// UserIDExists asks the ASes whose user namespaces cover the user.
func (a *API) UserIDExists(ctx context.Context, req *appserviceAPI.UserIDExistsRequest, resp *appserviceAPI.UserIDExistsResponse) error {
	r, err := a.q.QueryUser(ctx, req.UserID)
	if err != nil {
		return err
	}
	resp.UserIDExists = r.Exists
	return nil
}

// Locations looks up third-party locations; without a protocol, the
// locations behind params' alias (Dendrite's /thirdparty/location?alias=).
func (a *API) Locations(ctx context.Context, req *appserviceAPI.LocationRequest, resp *appserviceAPI.LocationResponse) error {
	params, err := url.ParseQuery(req.Params)
	if err != nil {
		return err
	}
	var raw []json.RawMessage
	if req.Protocol == "" {
		raw = a.q.LocationsByAlias(ctx, params.Get("alias"))
	} else {
		raw = a.q.Locations(ctx, req.Protocol, params)
	}
	resp.Locations, err = decodeAll[appserviceAPI.ASLocationResponse](raw)
	resp.Exists = len(resp.Locations) > 0
	return err
}

// User looks up third-party users; without a protocol, the users behind
// params' userid.
func (a *API) User(ctx context.Context, req *appserviceAPI.UserRequest, resp *appserviceAPI.UserResponse) error {
	params, err := url.ParseQuery(req.Params)
	if err != nil {
		return err
	}
	var raw []json.RawMessage
	if req.Protocol == "" {
		raw = a.q.UsersByID(ctx, params.Get("userid"))
	} else {
		raw = a.q.Users(ctx, req.Protocol, params)
	}
	resp.Users, err = decodeAll[appserviceAPI.ASUserResponse](raw)
	resp.Exists = len(resp.Users) > 0
	return err
}

// Protocols returns one protocol's metadata, or every protocol's.
func (a *API) Protocols(ctx context.Context, req *appserviceAPI.ProtocolRequest, resp *appserviceAPI.ProtocolResponse) error {
	all := map[string]map[string]any{}
	if req.Protocol != "" {
		if p, ok := a.q.Protocol(ctx, req.Protocol); ok {
			all[req.Protocol] = p
		}
	} else {
		all = a.q.Protocols(ctx)
	}
	resp.Protocols = make(map[string]appserviceAPI.ASProtocolResponse, len(all))
	for name, p := range all {
		b, err := json.Marshal(p)
		if err != nil {
			return err
		}
		var pr appserviceAPI.ASProtocolResponse
		if err := json.Unmarshal(b, &pr); err != nil {
			return fmt.Errorf("protocol %q: %w", name, err)
		}
		resp.Protocols[name] = pr
	}
	resp.Exists = len(resp.Protocols) > 0
	return nil
}

// decodeAll decodes the AS answers the queries package passed on; one that
// does not fit Dendrite's type is skipped, the first such error returned
// after the others are decoded.
func decodeAll[T any](raw []json.RawMessage) ([]T, error) {
	out := make([]T, 0, len(raw))
	var errs []error
	for _, r := range raw {
		var v T
		if err := json.Unmarshal(r, &v); err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, v)
	}
	if len(out) > 0 {
		return out, nil
	}
	return out, errors.Join(errs...)
}
