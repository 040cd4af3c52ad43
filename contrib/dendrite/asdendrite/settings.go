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
		QueryTimeout    time.Duration `yaml:"query_timeout"`
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
	return s, nil
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
