// Package queries asks application services before the homeserver acts:
// does this user or alias exist (so a bridge can create it lazily), ping,
// and third-party lookups. Nothing here runs on the event dispatch path.
package queries

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/registry"
)

// Config configures a Service.
type Config struct {
	Registry *registry.Registry
	// Client talks to the ASes; nil builds one with default timeouts.
	Client *asapi.Client
	// Wake, if set, is called with an AS id after a successful ping, so its
	// sender retries at once (dispatcher.Wake).
	Wake   func(asID string)
	Logger *zap.Logger
	// NegativeTTL is how long a "does not exist" answer is remembered
	// (default 10s); ProtocolTTL how long protocol metadata is (default 5m).
	NegativeTTL time.Duration
	ProtocolTTL time.Duration
	// NegativeSize bounds the "does not exist" answers remembered, least
	// recently used first out (default 10,000): the IDs come from clients,
	// unauthenticated ones included.
	NegativeSize int
	// Metrics, if set, counts queries by outcome.
	Metrics *metrics.Metrics
}

// Result is the answer to a user or alias query.
type Result struct {
	Exists bool
	// AS is the id of the AS that answered yes.
	AS string
}

// Service answers queries. Safe for concurrent use.
type Service struct {
	cfg    Config
	client *asapi.Client
	log    *zap.Logger
	sf     singleflight.Group

	// negative maps a query key to when its "does not exist" expires.
	// (Not the expirable LRU: its cleanup goroutine cannot be stopped.)
	negative *lru.Cache[string, time.Time]
	// negMu orders forgetting with remembering: forgets counts the Note
	// calls, and a query that saw one while it ran does not remember "no".
	negMu   sync.Mutex
	forgets uint64

	mu     sync.Mutex
	protos map[string]cachedProtocol
}

// New returns a Service.
func New(cfg Config) *Service {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.NegativeTTL <= 0 {
		cfg.NegativeTTL = 10 * time.Second
	}
	if cfg.ProtocolTTL <= 0 {
		cfg.ProtocolTTL = 5 * time.Minute
	}
	if cfg.NegativeSize <= 0 {
		cfg.NegativeSize = 10_000
	}
	negative, err := lru.New[string, time.Time](cfg.NegativeSize)
	if err != nil {
		panic(err) // only for a size <= 0, replaced above
	}
	c := cfg.Client
	if c == nil {
		c = asapi.New(asapi.Options{Logger: cfg.Logger})
	}
	return &Service{cfg: cfg, client: c, log: cfg.Logger, negative: negative, protos: map[string]cachedProtocol{}}
}

// Target is how an AS is reached.
func Target(as *registry.AppService) asapi.Target {
	t := asapi.Target{ID: as.ID, HSToken: as.HSToken, ASToken: as.ASToken, Legacy: as.Legacy}
	if as.HasURL {
		t.URL = as.URL
	}
	return t
}

// reachable reports whether as can be asked: it has a URL or a websocket
// open (then requests go over the socket, whatever the URL).
func (s *Service) reachable(as *registry.AppService) bool {
	return as.HasURL || s.client.Connected(as.ID)
}

// candidates orders the ASes to ask: exclusive owners first, then the
// others, each by registration order; ASes that cannot be reached (no URL,
// no websocket open) are never asked.
func (s *Service) candidates(set *registry.Set, hits []namespace.Hit) []*registry.AppService {
	var first, rest []*registry.AppService
	for _, h := range hits {
		as := set.All()[h.Owner]
		if !s.reachable(as) {
			continue
		}
		if h.Exclusive {
			first = append(first, as)
		} else {
			rest = append(rest, as)
		}
	}
	return append(first, rest...)
}

// QueryUser asks the ASes whose user namespaces cover userID whether it
// exists. An AS that fails is logged and the next one asked; the answer is
// then "no". Only a definite "no" (every AS asked answered 404) is
// remembered, for NegativeTTL. The error is only ever the caller's ctx
// ending.
func (s *Service) QueryUser(ctx context.Context, userID string) (Result, error) {
	set := s.cfg.Registry.Current()
	return s.query(ctx, "u:"+userID, s.candidates(set, set.UsersInterested(nil, userID)), "user", userID, s.client.QueryUser)
}

// QueryAlias is QueryUser for a room alias.
func (s *Service) QueryAlias(ctx context.Context, alias string) (Result, error) {
	set := s.cfg.Registry.Current()
	return s.query(ctx, "a:"+alias, s.candidates(set, set.AliasesInterested(nil, alias)), "alias", alias, s.client.QueryAlias)
}

// NoteUserRegistered forgets a cached "no such user" (the AS created it).
func (s *Service) NoteUserRegistered(userID string) { s.forget("u:" + userID) }

// NoteAliasCreated forgets a cached "no such alias".
func (s *Service) NoteAliasCreated(alias string) { s.forget("a:" + alias) }

func (s *Service) forget(key string) {
	s.negMu.Lock()
	s.forgets++
	s.negative.Remove(key)
	s.negMu.Unlock()
}

func (s *Service) query(ctx context.Context, key string, ases []*registry.AppService, what, id string,
	ask func(context.Context, asapi.Target, string) (bool, error)) (Result, error) {
	if len(ases) == 0 {
		return Result{}, nil
	}
	if until, ok := s.negative.Get(key); ok {
		if time.Now().Before(until) {
			return Result{}, nil
		}
		s.negative.Remove(key)
	}
	ch := s.sf.DoChan(key, func() (any, error) {
		// Shared by every caller: no single caller's cancellation ends it.
		qctx := context.WithoutCancel(ctx)
		s.negMu.Lock()
		forgets := s.forgets
		s.negMu.Unlock()
		definite := true
		for _, as := range ases {
			start := time.Now()
			ok, err := ask(qctx, Target(as), id)
			outcome := "not_found"
			if err != nil {
				outcome = "error"
			} else if ok {
				outcome = "found"
			}
			s.cfg.Metrics.Query(as.ID, what, outcome, time.Since(start))
			if err != nil {
				s.logFailure(as.ID, what, err)
				definite = false
				continue
			}
			if ok {
				return Result{Exists: true, AS: as.ID}, nil
			}
		}
		s.negMu.Lock()
		if definite && s.forgets == forgets {
			s.negative.Add(key, time.Now().Add(s.cfg.NegativeTTL))
		}
		s.negMu.Unlock()
		return Result{}, nil
	})
	select {
	case r := <-ch:
		return r.Val.(Result), nil
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

func (s *Service) logFailure(asID, what string, err error) {
	if errors.Is(err, asapi.ErrTokenMismatch) {
		s.log.Error("appservice rejected our hs_token (token mismatch)", zap.String("appservice", asID), zap.String("query", what))
		return
	}
	s.log.Warn("appservice query failed; asking the next one", zap.String("appservice", asID), zap.String("query", what), zap.Error(err))
}

// PingError is a failed ping, as the client-server API answers it.
type PingError struct {
	// Code is M_URL_NOT_SET, M_BAD_STATUS, M_CONNECTION_FAILED,
	// M_CONNECTION_TIMEOUT or M_NOT_FOUND; Status the HTTP status to answer.
	Code   string
	Status int
	// ASStatus and ASBody are the AS's answer, for M_BAD_STATUS.
	ASStatus int
	ASBody   string
	Err      error
}

func (e *PingError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %v", e.Code, e.Err)
	}
	return e.Code
}

func (e *PingError) Unwrap() error { return e.Err }

// Ping pings the AS asID and returns how long it took to answer. Success
// wakes the AS's sender.
func (s *Service) Ping(ctx context.Context, asID, txnID string) (time.Duration, error) {
	as := s.cfg.Registry.Current().ByID(asID)
	if as == nil {
		return 0, &PingError{Code: "M_NOT_FOUND", Status: 404}
	}
	if !s.reachable(as) {
		return 0, &PingError{Code: "M_URL_NOT_SET", Status: 400}
	}
	d, err := s.client.Ping(ctx, Target(as), txnID)
	if err == nil {
		if s.cfg.Wake != nil {
			s.cfg.Wake(asID)
		}
		return d, nil
	}
	var se *asapi.StatusError
	switch {
	case errors.As(err, &se):
		return 0, &PingError{Code: "M_BAD_STATUS", Status: 502, ASStatus: se.Status, ASBody: se.Body, Err: err}
	case errors.Is(err, asapi.ErrTimeout):
		return 0, &PingError{Code: "M_CONNECTION_TIMEOUT", Status: 504, Err: err}
	default:
		return 0, &PingError{Code: "M_CONNECTION_FAILED", Status: 502, Err: err}
	}
}
