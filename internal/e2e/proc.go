package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// KillWait bounds how long Kill and Stop wait for a process to be gone.
const KillWait = 10 * time.Second

// Proc is one started process in its own process group (a kvm guest's
// helpers die with it), its output in a log file.
type Proc struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	// waitErr is cmd.Wait's answer, set before exited closes.
	waitErr error
}

// StartProc runs argv (a command and its arguments, e.g. tandem's path
// and its flags, or `ip netns exec NS tandem ...`) with stdout and stderr
// appended to logPath. The caller owns the process: it must Kill it.
func StartProc(name, logPath string, argv ...string) (*Proc, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("start %s: no command", name)
	}
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{name: name, logPath: logPath, cmd: cmd, exited: make(chan struct{})}
	// Owned by the process: it ends when the process does, which Kill
	// makes happen within KillWait.
	go func() {
		p.waitErr = cmd.Wait()
		lf.Close()
		close(p.exited)
	}()
	return p, nil
}

// Name is the name StartProc was given.
func (p *Proc) Name() string { return p.name }

// LogPath is the file the process writes to.
func (p *Proc) LogPath() string { return p.logPath }

// Pid is the process's ID (and its process group's).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited is closed once the process has exited and its log is closed.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// WaitErr is how the process exited (nil while it runs or after exit 0).
func (p *Proc) WaitErr() error {
	select {
	case <-p.exited:
		return p.waitErr
	default:
		return nil
	}
}

// Running says whether the process has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Signal sends sig to the process group.
func (p *Proc) Signal(sig syscall.Signal) error {
	return syscall.Kill(-p.cmd.Process.Pid, sig)
}

// Kill SIGKILLs the process group (after a SIGCONT: a stopped process
// would outlive the wait otherwise) and waits at most KillWait until the
// process is gone.
func (p *Proc) Kill() error {
	if !p.Running() {
		return nil
	}
	p.Signal(syscall.SIGCONT)
	p.Signal(syscall.SIGKILL)
	return p.wait(KillWait, "SIGKILL")
}

// Stop sends sig (SIGTERM: a clean stop) and waits at most KillWait until
// the process is gone, killing it if it outlives the bound.
func (p *Proc) Stop(sig syscall.Signal) error {
	if !p.Running() {
		return nil
	}
	if err := p.Signal(sig); err != nil {
		return err
	}
	if err := p.wait(KillWait, sig.String()); err != nil {
		p.Kill()
		return err
	}
	return nil
}

func (p *Proc) wait(d time.Duration, what string) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.exited:
		return nil
	case <-t.C:
		return fmt.Errorf("%s still running %v after %s", p.name, d, what)
	}
}

// Log is the whole log (or the error reading it).
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// Tail is the log's last lines.
func (p *Proc) Tail(lines int) string { return Tail(p.Log(), lines) }

// Tail is the last lines of s.
func Tail(s string, lines int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// LastLine is s's last line.
func LastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// ProcessState is how the process ended (nil while it runs).
func (p *Proc) ProcessState() *os.ProcessState {
	select {
	case <-p.exited:
		return p.cmd.ProcessState
	default:
		return nil
	}
}
