/**
 * The C source of mesh-uffd, the destination's post-copy pager (see the comment at its top, and
 * pager.ts, which builds it with gcc on first use). It lives in a TypeScript string so that it travels
 * inside the agent's bundle (dist/) like every other source (String.raw keeps its backslashes; the
 * text has no backtick and no dollar-brace).
 */
export const UFFD_HELPER_SOURCE = String.raw`/*
 * mesh-uffd — the destination's post-copy pager (mesh, vm/postcopy).
 *
 * Serves the first touch of every guest page that has not arrived yet. QEMU maps the guest RAM file
 * (tmpfs, share=on); this helper obtains a userfaultfd registered on *QEMU's* mapping of it (a uffd
 * acts on the memory of the process that created it, so QEMU must create it): it makes QEMU's main
 * thread execute one userfaultfd(2) (ptrace: single-step over an existing 'syscall' instruction with
 * the registers set, then restore them; no code is written into QEMU) and copies the new descriptor
 * out with pidfd_getfd(2). QEMU keeps its own copy open, on purpose: if this helper dies, the uffd and
 * its registration stay, so a page that never arrived blocks the faulting guest thread instead of
 * silently reading zeros, and a restarted agent takes the same uffd back ('--fd N') and carries on.
 *
 * The agent tells the helper which chunks are owed (their bytes are still on the source). The helper
 * punches those chunks out of the RAM file (so that QEMU's next touch faults), and then:
 *   - a fault on an owed chunk is reported to the agent (once per chunk); the agent fetches the chunk
 *     from the source and hands it back (FILL); UFFDIO_COPY places it atomically and wakes the guest;
 *   - a fault on any other hole is a page that is zero on the source too: filled with zeros at once;
 *   - chunks that arrive in the background are placed the same way (a page already present, i.e.
 *     faulted in and maybe written since, is never overwritten: UFFDIO_COPY fails with EEXIST).
 *
 * Usage: mesh-uffd PID RAM_PATH RAM_BYTES CHUNK_BYTES [--fd N]
 * Protocol (binary, little-endian): every message is [u8 type][u32 length][payload].
 *   agent → helper:  'O' owed bitmap (one bit per chunk)   'F' u32 chunk + chunk bytes
 *                    'X' finish (all owed chunks must be in: unregister, reply 'D', exit)
 *                    'Q' quit now (the VM is being stopped), no reply
 *   helper → agent:  'H' u32 fd in QEMU, u64 base, u64 length, u8 regrabbed
 *                    'R' u32 owed chunks + their bitmap (holes now: punched, or still holes when
 *                        taken back)   'P' u32 chunk (first fault)
 *                    'D' u64 owed faults, u64 zero faults, u64 chunks filled, u64 max wait us,
 *                        u64 total wait us   'E' text (fatal; the helper exits non-zero)
 * stdin closing (the agent died) ends the helper WITHOUT unregistering (see above).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MAX_MSG (16u * 1024u * 1024u)

static int out_fd = 1;
static pid_t qpid;
static uint64_t ram_bytes, chunk_bytes, nchunks;
static uint64_t base;            /* QEMU's address of the RAM mapping */
static int ufd = -1;             /* our copy of the uffd */
static int ram_fd = -1;
static uint8_t *owed;            /* per chunk: 1 = still on the source */
static uint8_t *reported;        /* per chunk: 'P' sent */
static uint64_t *fault_at;       /* per chunk: first fault, us (0 = none) */
static uint64_t n_owed_faults, n_zero_faults, n_filled, max_wait_us, sum_wait_us;
static uint8_t zero_page[PAGE] __attribute__((aligned(PAGE)));

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int write_all(int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
      struct pollfd pf = {.fd = fd, .events = POLLOUT};
      poll(&pf, 1, 1000);
      continue;
    }
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static void send_msg(char type, const void *payload, uint32_t len) {
  uint8_t hdr[5] = {(uint8_t)type, (uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16), (uint8_t)(len >> 24)};
  if (write_all(out_fd, hdr, 5) || (len && write_all(out_fd, payload, len))) exit(3);
}

static void die(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "mesh-uffd: %s\n", buf);
  send_msg('E', buf, (uint32_t)strlen(buf));
  exit(2);
}

static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get_u32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* QEMU's mapping of RAM_PATH of exactly RAM_BYTES (from /proc/PID/maps). */
static uint64_t find_mapping(const char *path) {
  char fn[64], line[4096];
  snprintf(fn, sizeof fn, "/proc/%d/maps", qpid);
  FILE *f = fopen(fn, "r");
  if (!f) die("cannot read %s: %s", fn, strerror(errno));
  uint64_t found = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    int off = 0;
    if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &off) < 2 || off == 0) continue;
    char *name = line + off;
    name[strcspn(name, "\n")] = 0;
    if (strcmp(name, path) == 0 && hi - lo == ram_bytes) {
      found = lo;
      break;
    }
  }
  fclose(f);
  if (!found) die("no mapping of %s (%" PRIu64 " bytes) in process %d", path, ram_bytes, qpid);
  return found;
}

/* An address in QEMU's memory holding the bytes of a 'syscall' instruction (0f 05), from the vDSO or
 * else any executable mapping. Any such byte pair decodes as 'syscall' when RIP points at it. */
static uint64_t find_syscall_insn(void) {
  char fn[64], line[4096];
  snprintf(fn, sizeof fn, "/proc/%d/maps", qpid);
  FILE *f = fopen(fn, "r");
  if (!f) die("cannot read %s: %s", fn, strerror(errno));
  snprintf(fn, sizeof fn, "/proc/%d/mem", qpid);
  int mem = open(fn, O_RDONLY);
  if (mem < 0) die("cannot open %s: %s", fn, strerror(errno));
  uint64_t hit = 0;
  for (int pass = 0; pass < 2 && !hit; pass++) {
    rewind(f);
    while (!hit && fgets(line, sizeof line, f)) {
      unsigned long lo, hi;
      char perms[8];
      if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[2] != 'x') continue;
      if (pass == 0 && !strstr(line, "[vdso]")) continue;
      size_t len = hi - lo > (1u << 20) ? (1u << 20) : hi - lo;
      uint8_t *buf = malloc(len);
      ssize_t n = buf ? pread(mem, buf, len, (off_t)lo) : -1;
      for (ssize_t i = 0; i + 1 < n; i++) {
        if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
          hit = lo + (uint64_t)i;
          break;
        }
      }
      free(buf);
    }
  }
  close(mem);
  fclose(f);
  if (!hit) die("no syscall instruction found in process %d", qpid);
  return hit;
}

/* Waits for the next stop of the tracee; a stop for a real signal is remembered (re-delivered at detach). */
static int wait_stop(int *pending_sig) {
  int status;
  for (;;) {
    if (waitpid(qpid, &status, __WALL) < 0) {
      if (errno == EINTR) continue;
      die("waitpid %d: %s", qpid, strerror(errno));
    }
    if (WIFEXITED(status) || WIFSIGNALED(status)) die("process %d ended during attach", qpid);
    if (!WIFSTOPPED(status)) continue;
    int event = status >> 16;
    int sig = WSTOPSIG(status);
    if (event == PTRACE_EVENT_STOP) return 0;
    if (sig == SIGTRAP) return SIGTRAP;
    if (pending_sig && !*pending_sig) *pending_sig = sig;
    return sig;
  }
}

/* Makes QEMU's main thread run userfaultfd(2); returns the descriptor number in QEMU. */
static int inject_userfaultfd(void) {
  uint64_t insn = find_syscall_insn();
  int pending = 0;
  if (ptrace(PTRACE_SEIZE, qpid, 0, 0)) die("ptrace seize %d: %s", qpid, strerror(errno));
  if (ptrace(PTRACE_INTERRUPT, qpid, 0, 0)) die("ptrace interrupt: %s", strerror(errno));
  /* Signals that arrive first are let through; the interrupt stop follows. */
  for (;;) {
    int r = wait_stop(NULL);
    if (r == 0) break;
    if (ptrace(PTRACE_CONT, qpid, 0, r == SIGTRAP ? 0 : r)) die("ptrace cont: %s", strerror(errno));
  }
  struct user_regs_struct saved, regs;
  if (ptrace(PTRACE_GETREGS, qpid, 0, &saved)) die("getregs: %s", strerror(errno));
  regs = saved;
  regs.rip = insn;
  regs.rax = SYS_userfaultfd;
  regs.rdi = O_CLOEXEC | O_NONBLOCK;
  /* Not inside a syscall as far as the kernel's restart logic is concerned. */
  regs.orig_rax = (unsigned long long)-1;
  if (ptrace(PTRACE_SETREGS, qpid, 0, &regs)) die("setregs: %s", strerror(errno));
  for (int tries = 0;; tries++) {
    if (ptrace(PTRACE_SINGLESTEP, qpid, 0, 0)) die("singlestep: %s", strerror(errno));
    int r = wait_stop(&pending);
    if (ptrace(PTRACE_GETREGS, qpid, 0, &regs)) die("getregs: %s", strerror(errno));
    if (r == SIGTRAP && regs.rip == insn + 2) break;
    if (tries > 16) die("the injected syscall did not complete");
    /* A signal stopped it before the instruction ran: step again (the signal waits for the detach). */
  }
  long ret = (long)regs.rax;
  if (ptrace(PTRACE_SETREGS, qpid, 0, &saved)) die("restore regs: %s", strerror(errno));
  if (ptrace(PTRACE_DETACH, qpid, 0, pending)) die("detach: %s", strerror(errno));
  if (ret < 0) die("userfaultfd() in process %d failed: %s", qpid, strerror((int)-ret));
  return (int)ret;
}

static int grab_fd(int remote) {
  int pidfd = (int)syscall(SYS_pidfd_open, qpid, 0);
  if (pidfd < 0) die("pidfd_open %d: %s", qpid, strerror(errno));
  int fd = (int)syscall(SYS_pidfd_getfd, pidfd, remote, 0);
  if (fd < 0) die("pidfd_getfd %d/%d: %s", qpid, remote, strerror(errno));
  close(pidfd);
  return fd;
}

/* Places 'len' bytes at offset 'off' of guest RAM, skipping pages already present. */
static void place(uint64_t off, const uint8_t *src, uint64_t len) {
  uint64_t done = 0;
  while (done < len) {
    struct uffdio_copy c = {.dst = base + off + done, .src = (uint64_t)(uintptr_t)(src + done), .len = len - done, .mode = 0};
    if (ioctl(ufd, UFFDIO_COPY, &c) == 0) return;
    int err = errno;
    if (c.copy > 0) done += (uint64_t)c.copy;
    if (err == EEXIST) {
      /* This page is present (faulted in, maybe written since): keep it, go on with the next. */
      if (c.copy <= 0) done += PAGE;
      done = (done + PAGE - 1) / PAGE * PAGE;
      continue;
    }
    if (err == EAGAIN || err == EINTR) continue;
    die("UFFDIO_COPY at offset %" PRIu64 ": %s", off + done, strerror(err));
  }
}

static void on_fault(uint64_t addr) {
  if (addr < base || addr >= base + ram_bytes) return;
  uint64_t off = (addr - base) & ~(uint64_t)(PAGE - 1);
  uint64_t chunk = off / chunk_bytes;
  if (owed[chunk]) {
    if (!fault_at[chunk]) fault_at[chunk] = now_us();
    if (!reported[chunk]) {
      reported[chunk] = 1;
      n_owed_faults++;
      uint8_t p[4];
      put_u32(p, (uint32_t)chunk);
      send_msg('P', p, 4);
    }
    return;
  }
  /* A hole that is not owed: the page is zero on the source as well. */
  n_zero_faults++;
  place(off, zero_page, PAGE);
}

static void drain_faults(void) {
  struct uffd_msg msgs[64];
  for (;;) {
    ssize_t n = read(ufd, msgs, sizeof msgs);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      die("read uffd: %s", strerror(errno));
    }
    for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++)
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) on_fault(msgs[i].arg.pagefault.address);
  }
}

static void handle(uint8_t type, const uint8_t *p, uint32_t len) {
  switch (type) {
    case 'O': {
      if (len != (nchunks + 7) / 8) die("owed bitmap of %u bytes for %" PRIu64 " chunks", len, nchunks);
      for (uint64_t c = 0; c < nchunks; c++) owed[c] = (uint8_t)(p[c / 8] >> (c % 8) & 1);
      break;
    }
    case 'F': {
      if (len != 4 + chunk_bytes) die("fill of %u bytes", len);
      uint32_t c = get_u32(p);
      if (c >= nchunks) die("fill of chunk %u of %" PRIu64, c, nchunks);
      if (!owed[c]) break; /* already placed (a background copy and a fault reply crossed) */
      place((uint64_t)c * chunk_bytes, p + 4, chunk_bytes);
      owed[c] = 0;
      n_filled++;
      if (fault_at[c]) {
        uint64_t w = now_us() - fault_at[c];
        sum_wait_us += w;
        if (w > max_wait_us) max_wait_us = w;
      }
      break;
    }
    case 'X': {
      for (uint64_t c = 0; c < nchunks; c++)
        if (owed[c]) die("finish with chunk %" PRIu64 " still owed", c);
      drain_faults();
      struct uffdio_range r = {.start = base, .len = ram_bytes};
      if (ioctl(ufd, UFFDIO_UNREGISTER, &r)) die("unregister: %s", strerror(errno));
      uint8_t d[40];
      put_u64(d, n_owed_faults);
      put_u64(d + 8, n_zero_faults);
      put_u64(d + 16, n_filled);
      put_u64(d + 24, max_wait_us);
      put_u64(d + 32, sum_wait_us);
      send_msg('D', d, sizeof d);
      exit(0);
    }
    case 'Q':
      exit(0);
    default:
      die("unknown message type %u", type);
  }
}

/* Punches one chunk out of the RAM file: QEMU's next touch of it faults. */
static void punch(uint64_t c) {
  if (fallocate(ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(c * chunk_bytes), (off_t)chunk_bytes))
    die("punching chunk %" PRIu64 ": %s", c, strerror(errno));
}

/* Whether any page of the chunk is a hole (not yet placed). */
static int has_hole(uint64_t c) {
  off_t start = (off_t)(c * chunk_bytes), end = start + (off_t)chunk_bytes;
  off_t h = lseek(ram_fd, start, SEEK_HOLE);
  return h >= 0 && h < end;
}

int main(int argc, char **argv) {
  if (argc != 5 && !(argc == 7 && !strcmp(argv[5], "--fd"))) {
    fprintf(stderr, "usage: mesh-uffd PID RAM_PATH RAM_BYTES CHUNK_BYTES [--fd N]\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  qpid = (pid_t)atoi(argv[1]);
  const char *path = argv[2];
  ram_bytes = strtoull(argv[3], NULL, 10);
  chunk_bytes = strtoull(argv[4], NULL, 10);
  int regrab = argc == 7;
  if (qpid <= 0 || !ram_bytes || !chunk_bytes || chunk_bytes % PAGE || ram_bytes % chunk_bytes)
    die("bad arguments");
  nchunks = ram_bytes / chunk_bytes;
  owed = calloc(nchunks, 1);
  reported = calloc(nchunks, 1);
  fault_at = calloc(nchunks, sizeof *fault_at);
  if (!owed || !reported || !fault_at) die("out of memory");
  ram_fd = open(path, O_RDWR | O_CLOEXEC);
  if (ram_fd < 0) die("open %s: %s", path, strerror(errno));
  base = find_mapping(path);
  int remote;
  if (regrab) {
    remote = atoi(argv[6]);
    ufd = grab_fd(remote);
  } else {
    remote = inject_userfaultfd();
    ufd = grab_fd(remote);
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(ufd, UFFDIO_API, &api)) die("UFFDIO_API: %s", strerror(errno));
    struct uffdio_register reg = {.range = {.start = base, .len = ram_bytes}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(ufd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER: %s", strerror(errno));
    if (!(reg.ioctls & ((uint64_t)1 << _UFFDIO_COPY))) die("UFFDIO_COPY not available on this mapping");
  }
  int fl = fcntl(ufd, F_GETFL);
  fcntl(ufd, F_SETFL, fl | O_NONBLOCK);
  uint8_t hello[21];
  put_u32(hello, (uint32_t)remote);
  put_u64(hello + 4, base);
  put_u64(hello + 12, ram_bytes);
  hello[20] = (uint8_t)regrab;
  send_msg('H', hello, sizeof hello);

  /* Messages from the agent: a growing buffer, parsed as it fills. */
  size_t cap = 1u << 20, have = 0;
  uint8_t *buf = malloc(cap);
  if (!buf) die("out of memory");
  int owed_seen = 0;
  for (;;) {
    /* Faults are served only once the owed set is known: before it, a fault on an owed chunk would look
       like a zero page (taken back, the guest's threads have been waiting on owed chunks all along). */
    struct pollfd pf[2] = {{.fd = 0, .events = POLLIN}, {.fd = ufd, .events = owed_seen ? POLLIN : 0}};
    if (poll(pf, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll: %s", strerror(errno));
    }
    if (pf[1].revents & POLLIN) drain_faults();
    if (pf[1].revents & (POLLERR | POLLHUP)) die("the userfaultfd closed (process %d gone?)", qpid);
    if (!(pf[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    if (cap - have < 65536) {
      cap *= 2;
      buf = realloc(buf, cap);
      if (!buf) die("out of memory");
    }
    ssize_t n = read(0, buf + have, cap - have);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return 0; /* the agent is gone: leave the registration (and QEMU's uffd) as it is */
    have += (size_t)n;
    size_t at = 0;
    while (have - at >= 5) {
      uint32_t len = get_u32(buf + at + 1);
      if (len > MAX_MSG) die("message of %u bytes", len);
      if (have - at - 5 < len) break;
      uint8_t type = buf[at];
      if (type == 'O' && !owed_seen) {
        owed_seen = 1;
        handle(type, buf + at + 5, len);
        /* Fresh: punch the owed chunks. Taken back: what is still a hole is what is still owed. */
        uint32_t count = 0;
        size_t blen = (size_t)((nchunks + 7) / 8);
        uint8_t *r = calloc(4 + blen, 1);
        if (!r) die("out of memory");
        for (uint64_t c = 0; c < nchunks; c++) {
          if (!owed[c]) continue;
          if (regrab) owed[c] = (uint8_t)has_hole(c);
          else punch(c);
          count += owed[c];
          if (owed[c]) r[4 + c / 8] |= (uint8_t)(1u << (c % 8));
        }
        put_u32(r, count);
        send_msg('R', r, (uint32_t)(4 + blen));
        free(r);
      } else {
        handle(type, buf + at + 5, len);
      }
      at += 5 + len;
      if (owed_seen) drain_faults();
    }
    memmove(buf, buf + at, have - at);
    have -= at;
  }
}
`
