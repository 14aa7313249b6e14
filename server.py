"""The pre-forking server: a master that starts bjoern workers, replaces any that dies or is stuck,
on SIGTERM, SIGINT or SIGHUP has each drain (finish what it has, then leave) before it exits, and on
SIGUSR2 serves the code now on disk without refusing a connection."""
import contextlib
import fcntl
import gc
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import models
import telemetry

STOPS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # what stops the master, which stops its workers with SIGTERM
RELOAD = signal.SIGUSR2  # as nginx's binary upgrade: SIGHUP stays a stop, which a closed terminal sends
SIGNALS = STOPS | {RELOAD}
IDLE_GRACE_MS = 2000  # see is_in_use(); nginx closes its idle upstream connections sooner (keepalive_timeout 1s)
OLD_WORKERS = 'PEOPLE_OLD_WORKERS'  # a reload's exec() hands the previous code's workers to the new master


class Master:
    """Serve with pre-forked bjoern workers: replace any that dies or is stuck past the request
    deadline; on SIGTERM or SIGINT ask each to drain (SIGTERM), and wait for them."""

    def __init__(self, app, config, watch):
        self.app, self.config, self.watch = app, config, watch
        self.log = telemetry.JsonLog(config.log_level)
        self.workers = {}  # pid -> slot in the watch
        self.old = {int(pid) for pid in os.environ.pop(OLD_WORKERS, '').split(',') if pid}  # serving until ours listen
        self.stopping = self.reloading = self.old_signalled = False
        self.inherited = inherited_listener()
        if self.inherited:
            self.config.host, self.config.port = self.inherited.getsockname()[:2]

    def run(self):
        import bjoern  # imported here so that tests and the other commands do not need its C build
        self.bjoern = bjoern
        db = models.database.obj
        # NOTE: a connection must never cross fork(): the master closes its own for real (a pool's
        # close() only returns it to the pool), a child forgets any it inherited (models), and
        # each worker opens its own.
        getattr(db, 'close_all', db.close)()
        if not self.old:  # after a reload, the old workers' counts are still to be archived
            telemetry.clear(self.config.metrics_dir)
        self.listening, self.ready = os.pipe()  # a new worker writes a byte to `ready` once it accepts connections
        os.set_blocking(self.listening, False)
        for stop in STOPS:  # SIGHUP too: a closed terminal must not leave workers serving without a master
            signal.signal(stop, self.stop)
        signal.signal(RELOAD, self.reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked across a reload's exec()
        self.log('info', 'serving', url=f'http://{self.config.host}:{self.config.port}/', workers=self.config.workers,
                 pid=os.getpid(), tokens='on' if self.config.auth else 'off', database=telemetry.safe_url(self.config.database_url),
                 reloaded=bool(self.old))
        listening = 0
        while self.workers or self.old or not self.stopping:
            for slot in set(range(self.config.workers)) - set(self.workers.values()):
                self.spawn(slot)  # at start, after a failed fork(), and for a dead worker; never once stopping
            with contextlib.suppress(BlockingIOError):
                listening += len(os.read(self.listening, 64))
            if self.old and not self.old_signalled and listening >= self.config.workers:
                self.log('info', 'new workers listening; the old ones drain', old=sorted(self.old))
                self.signal_old()
            if self.reloading and not self.old:  # one at a time: the next once the old workers are gone
                self.reloading = False
                self.reexec()
            pid, status = os.waitpid(-1, os.WNOHANG) if self.workers or self.old else (0, 0)
            if pid == 0:
                self.kill_stuck()
                time.sleep(0.1)
                continue
            slot = self.workers.pop(pid, None)
            try:
                telemetry.retire(self.config.metrics_dir, pid)  # its counts stay in the totals; its file goes
            except Exception as error:  # a full or vanished metrics directory must never stop the master
                self.log('error', "a dead worker's counts could not be archived", worker=pid, cause=repr(error))
            if slot is None:  # a worker of the code before a reload, or (as a container's PID 1) an orphan
                self.old.discard(pid)
                continue
            self.watch.cells[slot] = 0.0
            if not self.stopping:
                self.log('warning', 'worker ended; starting another', worker=pid, wait_status=status)
                time.sleep(0.2)  # a worker that dies at start must not make this a busy loop
        self.log('info', 'stopped')

    def spawn(self, slot):
        # NOTE: stops are held off across fork(), so that each reaches every worker in self.workers and
        # none starts after one (CPython runs a handler already due before pthread_sigmask() returns, so
        # `stopping` is current); the child holds SIGTERM until it has a listener to drain.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = None if self.stopping else os.fork()
        except OSError as error:  # out of processes or memory: run() tries again shortly
            self.log('error', 'cannot start a worker', cause=repr(error))
            pid = None
        if pid != 0:
            if pid:
                self.workers[pid] = slot
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            return
        # NOTE: bjoern dies at once on SIGTERM. On SIGINT it stops accepting, but a second SIGINT (a group
        # stop sends two) kills it mid-request, idle keep-alive connections hold it for ever, and it stops
        # the 0.1 s timer that runs Python's signal handlers. So a worker never lets SIGINT through (the
        # master turns every stop into SIGTERM) and drains by itself, in drain().
        try:  # never unwind into the master's frames, which this process copied
            self.watch.slot, self.drain_deadline = slot, None
            self.listener = self.inherited or self.bjoern.bind_and_listen(self.config.host, self.config.port, reuse_port=True)
            signal.signal(signal.SIGTERM, self.drain)
            signal.signal(signal.SIGALRM, self.drain)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # SIGINT, SIGHUP and SIGUSR2 stay blocked
            os.write(self.ready, b'.')
            # Everything loaded so far lives as long as the worker: keep it out of the garbage
            # collector's full passes, which otherwise rescan it every few thousand requests.
            gc.collect()
            gc.freeze()
            self.bjoern.server_run(self.listener, self.app)
        except BaseException as error:
            self.log('error', 'worker failed', cause=repr(error))
            os._exit(1)
        os._exit(0)

    def drain(self, signum, frame):
        """A worker's stop, on SIGTERM then every 0.1 s: stop accepting, close each connection once it is
        answered (idle ones once idle IDLE_GRACE_MS), and leave when none is left, or after drain_seconds when those
        left are answers their clients do not read. No request is cut before drain_seconds, however slowly
        it arrives; only one whose bytes come in the same tick as its connection's last answer is."""
        # NOTE: a group stop brings two SIGTERMs, and Python runs the second's handler inside the first's:
        # the deadline, stored in one step, is what both go by (a flag set first once left the second with
        # no deadline, raising into a request and leaving the worker serving on).
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_seconds
            self.watch.is_draining = True
            # bjoern's accept watcher is left on a closed socket that never wakes it, so server_run()
            # does not return: the worker leaves through os._exit() below. An inherited socket stays
            # open in the other processes, whose new connections still wake this worker's loop for
            # nothing (accept() fails) until one of them takes each: some CPU, for one drain.
            self.listener.close()  # new connections go to workers still accepting, else are refused
            signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
        # NOTE: deciding here, in the worker's one thread, leaves no gap between "idle" and "killed" for a
        # request to fall into. Unsent bytes in the kernel mark an answer its client is not reading; a
        # request still running, or answered but not yet written, has none, so it is always waited for.
        waiting, patient = False, time.monotonic() < self.drain_deadline
        for fd in os.listdir('/proc/self/fd'):
            with contextlib.suppress(OSError):  # not a socket, or closed meanwhile
                connection = socket.socket(fileno=int(fd))
                try:
                    if connection.family == socket.AF_INET and connection.getsockname()[1] == self.config.port:
                        unsent = int.from_bytes(fcntl.ioctl(connection, termios.TIOCOUTQ, bytes(4)), sys.byteorder)
                        waiting |= not unsent or patient
                        if not (patient and is_in_use(connection)):
                            connection.shutdown(socket.SHUT_RD)  # bjoern reads the end once it has answered
                finally:
                    connection.detach()
        if not waiting:
            self.watch.before_exit()  # no request is running: what the worker still holds in memory is saved
            os._exit(0)

    def kill_stuck(self):
        for pid, slot in self.workers.items():
            if self.watch.is_stuck(slot, self.config.request_deadline):
                self.log('error', 'worker stuck past the request deadline; killing it', worker=pid,
                         deadline=self.config.request_deadline)
                os.kill(pid, signal.SIGKILL)
                self.watch.cells[slot] = 0.0

    def stop(self, signum, frame):
        if not self.stopping:
            self.stopping = True
            self.log('info', 'draining', workers=len(self.workers), seconds=self.config.drain_seconds)
            for pid in self.workers:
                os.kill(pid, signal.SIGTERM)
            self.signal_old()

    def signal_old(self):
        for pid in self.old:
            with contextlib.suppress(ProcessLookupError):  # drained and exited, not yet reaped
                os.kill(pid, signal.SIGTERM)
        self.old_signalled = True

    def reload(self, signum, frame):
        self.reloading = True  # acted on in run()'s loop, not inside whatever this signal interrupted

    def reexec(self):
        """Serve the code now on disk: check in a fresh interpreter that it starts, then become it. exec()
        keeps the pid (systemd's main pid, the workers' parent): the new master starts new workers, and the
        old ones drain once all of those listen. The listeners are the workers' own (SO_REUSEPORT), so the
        port is served throughout; net.ipv4.tcp_migrate_req=1 hands a closing one's queue to the others."""
        check = subprocess.run([*sys.orig_argv, '--check'], capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            why = (check.stderr.strip().splitlines() or [f'exit status {check.returncode}'])[-1]
            self.log('error', 'reload failed: the new code does not start; the running workers go on serving', cause=why)
        elif not self.stopping:
            self.log('info', 'reloading', old=sorted(self.workers))
            os.environ[OLD_WORKERS] = ','.join(map(str, self.workers))
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # the new master takes them once it has handlers
            os.execv(sys.executable, sys.orig_argv)


def inherited_listener():
    """The listening socket systemd passes (socket activation, deploy/people.socket), or None. It stays
    open while the service restarts: connections wait in its queue instead of being refused. All workers
    accept from it, and a reload's exec() keeps it (same pid, so LISTEN_PID still names this process)."""
    if os.environ.get('LISTEN_PID') == str(os.getpid()) and os.environ.get('LISTEN_FDS') == '1':
        listener = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
        # NOTE: every worker wakes for each new connection and one accept() wins: on a blocking socket
        # the others would wait inside accept() for the next one, with their own requests unread.
        listener.setblocking(False)
        return listener


def is_in_use(connection):
    """Whether a request may be on this connection: one has come in since its last answer (or it has had
    none yet) and is still arriving or running; or the connection was answered or opened less than
    IDLE_GRACE_MS ago, so that its client's next request may be on the way (and is answered, with
    Connection: close; a connection shut as the request goes out fails it). bjoern reads eagerly, so only
    the kernel's TCP_INFO tells: the milliseconds since data was last sent and received (since the
    handshake, before any), and how many segments carried data each way."""
    info = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    sent_ago, received_ago = struct.unpack_from('=I4xI', info, 44)  # tcpi_last_data_sent, tcpi_last_data_recv
    data_in, data_out = struct.unpack_from('=II', info, 152)  # tcpi_data_segs_in, tcpi_data_segs_out
    arriving = data_in > 0 and (data_out == 0 or received_ago < sent_ago)
    return arriving or min(sent_ago, received_ago) < IDLE_GRACE_MS
