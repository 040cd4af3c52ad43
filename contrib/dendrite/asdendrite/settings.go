// Package asdendrite puts asdispatch in place of Dendrite's appservice
// component: an AppServiceInternalAPI whose queries go through asdispatch's
// queries package and whose event delivery is one JetStream consumer handing
// every new room event to dispatcher.Submit.
package asdendrite

import (
	"bytes"
	"fmt"
	"os"
	"time"

	"gopkg.in/yaml.v3"
)

// Settings are asdispatch's own settings, read from the `asdispatch:`
// section of Dendrite's config file (Dendrite ignores keys it does not know).
type Settings struct {
	// DataDir holds the SQLite store (default "./asdispatch").
	DataDir string `yaml:"data_dir"`
	// PostgresDSN, if set, keeps the dispatcher state in PostgreSQL instead.
	PostgresDSN string `yaml:"postgres_dsn"`
	AppService  struct {
		RetryInitial    time.Duration `yaml:"retry_initial"`
		RetryMax        time.Duration `yaml:"retry_max"`
		MaxEventsPerTxn int           `yaml:"max_events_per_txn"`
		MaxTxnBytes     int           `yaml:"max_txn_bytes"`
		// CatchupMaxEventsPerTxn lets the transactions of an AS with a
		// backlog grow to that many events, max_txn_bytes still capping
		// them (default 0: off).
		CatchupMaxEventsPerTxn int           `yaml:"catchup_max_events_per_txn"`
		QueryTimeout           time.Duration `yaml:"query_timeout"`
	} `yaml:"appservice"`
}

// LoadSettings reads the `asdispatch:` section of the Dendrite config file
// at path. A missing section gives the defaults; unknown keys inside it are
// an error, so a typo is not silently ignored.
func LoadSettings(path string) (Settings, error) {
	var s Settings
	data, err := os.ReadFile(path)
	if err != nil {
		return s, fmt.Errorf("asdispatch settings: %w", err)
	}
	var doc struct {
		AsDispatch yaml.Node `yaml:"asdispatch"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return s, fmt.Errorf("asdispatch settings: %s: %w", path, err)
	}
	if !doc.AsDispatch.IsZero() {
		if err := decodeStrict(&doc.AsDispatch, &s); err != nil {
			return s, fmt.Errorf("asdispatch settings: %s: section asdispatch: %w", path, err)
		}
	}
	if s.DataDir == "" {
		s.DataDir = "./asdispatch"
	}
	if err := s.checkTxnCaps(); err != nil {
		return s, fmt.Errorf("asdispatch settings: %s: section asdispatch: appservice: %w", path, err)
	}
	return s, nil
}

// checkTxnCaps checks the transaction caps (0: the default).
func (s *Settings) checkTxnCaps() error {
	a := s.AppService
	events := a.MaxEventsPerTxn
	if events == 0 {
		events = 100
	}
	switch {
	case a.MaxEventsPerTxn < 0:
		return fmt.Errorf("max_events_per_txn must not be negative, got %d", a.MaxEventsPerTxn)
	case a.MaxTxnBytes < 0:
		return fmt.Errorf("max_txn_bytes must not be negative, got %d", a.MaxTxnBytes)
	case a.CatchupMaxEventsPerTxn < 0:
		return fmt.Errorf("catchup_max_events_per_txn must not be negative (0 turns it off), got %d", a.CatchupMaxEventsPerTxn)
	case a.CatchupMaxEventsPerTxn > 0 && a.CatchupMaxEventsPerTxn < events:
		return fmt.Errorf("catchup_max_events_per_txn (%d) must be 0 (off) or at least max_events_per_txn (%d)", a.CatchupMaxEventsPerTxn, events)
	}
	return nil
}

func decodeStrict(n *yaml.Node, v any) error {
	b, err := yaml.Marshal(n)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	return dec.Decode(v)
}
