package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// fanout (and spread): the ASes get the messages while they are sent.
func fanout(ctx context.Context, name, bin string, o options) (result, error) {
	res := result{Server: name, ASes: o.ases, Groups: o.groups, Events: o.events}
	r, err := start(ctx, bin, o, &res)
	defer r.close()
	if err != nil {
		return res, err
	}
	sent, begin, err := r.send(ctx, o.events, o.senders)
	if err != nil {
		return res, err
	}
	res.AcceptedPerS = float64(o.events) / time.Since(begin).Seconds()
	if err := r.wait(o.timeout, o.stall); err != nil && !errors.Is(err, errStalled) {
		return res, err
	}
	sk := r.sk
	sk.mu.Lock()
	res.Missing = sk.missing()
	res.SendRetries = int(r.retries.Load())
	res.Resent = sk.resent
	var last time.Time
	var lat []float64
	total := 0
	for _, got := range sk.got {
		for i, at := range got {
			lat = append(lat, float64(at.Sub(sent[i]).Microseconds())/1000)
			if at.After(last) {
				last = at
			}
		}
		total += len(got)
	}
	slices.Sort(lat)
	res.DeliveredPerS = float64(total) / last.Sub(begin).Seconds()
	// Events each delivered to all its ASes (all of them unless some were lost).
	res.EventsPerS = float64(o.events) * float64(total) / float64(total+res.Missing) / last.Sub(begin).Seconds()
	res.P50LatencyMS = lat[len(lat)/2]
	res.P99LatencyMS = lat[len(lat)*99/100]
	res.Transactions, res.Duplicates, res.OutOfOrder = sk.txns, sk.dups, sk.outOfOrder
	sk.mu.Unlock()
	res.PeakFDs, res.PeakDriverFDs = r.fds.peaks()
	if err := r.hs.Stop(20 * time.Second); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	return res, nil
}

// setDown makes the ASes refuse (503) or accept transactions.
func (r *run) setDown(down bool) time.Time {
	r.sk.mu.Lock()
	defer r.sk.mu.Unlock()
	r.sk.down = down
	r.sk.firstAfterUp = time.Time{}
	r.sk.lastNew = time.Now()
	return r.sk.lastNew
}

// ping has each AS ping the homeserver (Matrix 1.7), as a returning bridge
// does at start-up; it returns the last status (stock Dendrite v0.13.8 has
// no such endpoint: 404).
func (r *run) ping(ctx context.Context, ases int) (int, error) {
	status := 0
	for i := 0; i < ases; i++ {
		u := fmt.Sprintf("%s/_matrix/client/v1/appservice/as%d/ping", r.hs.URL, i)
		_, err := harness.Call(ctx, "POST", u, "as-"+strconv.Itoa(i), map[string]any{"transaction_id": "bench"})
		var se *harness.StatusError
		switch {
		case err == nil:
			status = 200
		case errors.As(err, &se):
			status = se.Status
		default:
			return status, fmt.Errorf("ping: %w", err)
		}
	}
	return status, nil
}

// lastDelivery is the latest first receipt of any message; call with sk.mu held.
func (sk *sink) lastDelivery() time.Time {
	var last time.Time
	for _, got := range sk.got {
		for _, at := range got {
			if at.After(last) {
				last = at
			}
		}
	}
	return last
}

// startDown starts a run and sends the messages while the ASes answer 503,
// as catchup and crash begin; res gets the acceptance rate. Close the run
// (nil-safe) also on an error.
func startDown(ctx context.Context, bin string, o options, res *result) (*run, error) {
	r, err := start(ctx, bin, o, res)
	if err != nil {
		return r, err
	}
	r.setDown(true)
	_, begin, err := r.send(ctx, o.events, o.senders)
	if err != nil {
		return r, err
	}
	res.AcceptedPerS = float64(o.events) / time.Since(begin).Seconds()
	return r, nil
}

// catchup: the ASes answer 503 while the messages are sent, then come back;
// measured from their return until each has every message.
func catchup(ctx context.Context, name, bin string, o options) (result, error) {
	res := result{Server: name, ASes: o.ases, Groups: o.groups, Events: o.events}
	r, err := startDown(ctx, bin, o, &res)
	defer r.close()
	if err != nil {
		return res, err
	}
	up := r.setDown(false)
	if res.PingStatus, err = r.ping(ctx, o.ases); err != nil {
		return res, err
	}
	if err := r.wait(o.timeout, o.timeout); err != nil {
		return res, err
	}
	sk := r.sk
	sk.mu.Lock()
	last := sk.lastDelivery()
	res.CatchupS = last.Sub(up).Seconds()
	res.FirstAfterUpS = sk.firstAfterUp.Sub(up).Seconds()
	res.DrainS = last.Sub(sk.firstAfterUp).Seconds()
	res.DeliveredPerS = float64(o.events*o.ases) / res.CatchupS
	res.Refused = sk.refused
	res.Transactions, res.Duplicates, res.OutOfOrder = sk.txns, sk.dups, sk.outOfOrder
	sk.mu.Unlock()
	res.PeakFDs, res.PeakDriverFDs = r.fds.peaks()
	if err := r.hs.Stop(20 * time.Second); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	return res, nil
}

// crash: the messages are sent and acknowledged while the ASes answer 503;
// once each AS has refused a transaction the server is SIGKILLed, the ASes
// come back, the server restarts on the same data and the ASes ping it.
// The run ends --settle after every AS has every message (late replays
// count), or at --timeout with what is missing.
func crash(ctx context.Context, name, bin string, o options) (result, error) {
	res := result{Server: name, ASes: o.ases, Groups: o.groups, Events: o.events}
	r, err := startDown(ctx, bin, o, &res)
	defer r.close()
	if err != nil {
		return res, err
	}
	// Kill while a transaction is being retried: each AS has refused one.
	deadline := time.Now().Add(o.timeout)
	for {
		r.sk.mu.Lock()
		all := !slices.Contains(r.sk.refusedBy, 0)
		r.sk.mu.Unlock()
		if all {
			break
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("no refused transaction within %s", o.timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.hs.Kill()
	up := r.setDown(false)
	r.hs, err = harness.StartWithin(ctx, bin, r.cfg, o.logw, o.timeout)
	if err != nil {
		return res, fmt.Errorf("restart: %w", err)
	}
	r.fds.pid.Store(int64(r.hs.Cmd.Process.Pid))
	res.RestartS = time.Since(up).Seconds()
	if res.PingStatus, err = r.ping(ctx, o.ases); err != nil {
		return res, err
	}
	if err := r.wait(o.timeout, o.timeout); err == nil {
		time.Sleep(o.settle)
	}
	sk := r.sk
	sk.mu.Lock()
	last := sk.lastDelivery()
	res.CatchupS = last.Sub(up).Seconds()
	res.FirstAfterUpS = sk.firstAfterUp.Sub(up).Seconds()
	res.Missing = sk.missing()
	res.Refused = sk.refused
	res.TxnReused = sk.reused
	res.TxnRepeats = sk.repeats
	res.Disorder = sk.firstDisorder
	res.Transactions, res.Duplicates, res.OutOfOrder = sk.txns, sk.dups, sk.outOfOrder
	sk.mu.Unlock()
	res.PeakFDs, res.PeakDriverFDs = r.fds.peaks()
	if err := r.hs.Stop(20 * time.Second); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	// Missing messages are a result here, not a failure of the run.
	return res, nil
}
