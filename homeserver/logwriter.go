package homeserver

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"go.uber.org/zap"
)

// Sends are written to the log by one goroutine that groups them, as the
// dispatcher's store groups Submits: the sends that arrive while a commit
// is under way join the next one, so many sends share one SQLite
// transaction and one fsync. Each runs its checks (txnId, authorization,
// room state) inside that transaction under s.mu, after the sends before
// it in the batch, so it sees their writes exactly as it would see them
// committed one by one; a send that fails is rolled back to its savepoint
// alone. A send is answered only after the commit that holds it, so a 200
// still means "durably in the log".

// maxLogBatch bounds the sends one commit to the log takes.
const maxLogBatch = 256

// logWrite is one send waiting for the log writer.
type logWrite struct {
	ctx context.Context
	// run checks and writes the send inside tx; a *mxError it returns
	// answers the client.
	run  func(ctx context.Context, tx querier) error
	done chan error
}

type logWriter struct {
	in   chan *logWrite
	stop chan struct{}
	done chan struct{}
}

// startLogWriter starts the goroutine that writes sends to the log.
func (s *Server) startLogWriter() {
	s.lw = &logWriter{in: make(chan *logWrite, maxLogBatch), stop: make(chan struct{}), done: make(chan struct{})}
	go s.runLogWriter()
}

// stopLogWriter stops the log writer after the batch it is committing;
// sends still waiting are answered 503.
func (s *Server) stopLogWriter() {
	if s.lw == nil {
		return
	}
	close(s.lw.stop)
	<-s.lw.done
}

// writeLog runs run in the next group commit to the log and returns once
// that commit is durable (nil) or failed (503, retryable), or run's own
// refusal.
func (s *Server) writeLog(ctx context.Context, run func(ctx context.Context, tx querier) error) error {
	w := &logWrite{ctx: ctx, run: run, done: make(chan error, 1)}
	select {
	case s.lw.in <- w:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.lw.stop:
		return errUnavailable
	}
	// Once queued, wait for the outcome even if the client gave up: the
	// send may be committed, and a retry with its txnId finds it.
	return <-w.done
}

func (s *Server) runLogWriter() {
	defer close(s.lw.done)
	batch := make([]*logWrite, 0, maxLogBatch)
	for {
		select {
		case w := <-s.lw.in:
			batch = append(batch[:0], w)
		case <-s.lw.stop:
			s.drainLogWriter()
			return
		}
	collect:
		for len(batch) < maxLogBatch {
			select {
			case w := <-s.lw.in:
				batch = append(batch, w)
			default:
				break collect
			}
		}
		s.commitLogBatch(batch)
		clear(batch)
	}
}

// drainLogWriter answers the sends queued when the writer stops.
func (s *Server) drainLogWriter() {
	for {
		select {
		case w := <-s.lw.in:
			w.done <- errUnavailable
		default:
			return
		}
	}
}

// commitLogBatch runs the batch's sends in one transaction and answers
// each once it is committed.
func (s *Server) commitLogBatch(batch []*logWrite) {
	errs := make([]error, len(batch))
	landed, news, err := s.runLogBatch(batch, errs)
	for i, w := range batch {
		e := errs[i]
		if e == nil {
			e = err
		}
		w.done <- s.logWriteError(e)
	}
	if err == nil && landed > 0 {
		s.wake()
		s.kickHandover()
		if len(news) > 0 {
			s.notifyMembership(context.Background(), news)
		}
	}
}

// runLogBatch runs each send of batch under its own savepoint, recording
// its refusal in errs, then commits; it returns how many sends landed,
// the membership changes they made and the error of the transaction as a
// whole.
func (s *Server) runLogBatch(batch []*logWrite, errs []error) (landed int, news []membershipChange, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	mark0 := len(s.memberNews)
	defer func() {
		if err == nil {
			news = slices.Clone(s.memberNews[mark0:])
		} else {
			s.forgetPowerLevels("")
		}
		s.memberNews = s.memberNews[:mark0]
	}()
	// The transaction is shared: no one request's context may cancel it.
	ctx := context.Background()
	tx, err := s.st.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, nil, err
	}
	defer tx.Rollback()
	q := cachedTx{tx: tx, c: &s.st.stmts}
	for i, w := range batch {
		if errs[i] = w.ctx.Err(); errs[i] != nil {
			continue
		}
		if _, err := q.ExecContext(ctx, `SAVEPOINT send`); err != nil {
			return 0, nil, err
		}
		mark := len(s.memberNews)
		if errs[i] = runSend(ctx, q, w); errs[i] != nil {
			s.memberNews = s.memberNews[:mark]
			s.forgetPowerLevels("")
			if _, err := q.ExecContext(ctx, `ROLLBACK TO send`); err != nil {
				return 0, nil, err
			}
		} else {
			landed++
		}
		if _, err := q.ExecContext(ctx, `RELEASE send`); err != nil {
			return 0, nil, err
		}
	}
	if landed == 0 {
		return 0, nil, nil
	}
	if err := s.checkLogFault(); err != nil {
		return 0, nil, err
	}
	if err := tx.Commit(); err != nil {
		return 0, nil, fmt.Errorf("commit: %w", err)
	}
	return landed, nil, nil
}

// runSend runs one send. A panic fails that send alone (its savepoint is
// rolled back), as net/http would have contained it to its request, rather
// than ending the writer every send waits for.
func runSend(ctx context.Context, q querier, w *logWrite) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("send panicked: %v", p)
		}
	}()
	return w.run(ctx, q)
}

// logWriteError is what a client is answered for err: a refusal as it
// is, a failure of the log as 503 (retryable), never the raw error.
func (s *Server) logWriteError(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := asMatrixError(err); ok {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	s.log.Error("writing to the event log failed", zap.Error(err))
	return errUnavailable
}
