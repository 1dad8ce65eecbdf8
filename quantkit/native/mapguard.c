/* Memory maps of source files that survive the file being truncated under them.

Touching a page of a map past the end of its file raises SIGBUS, which kills the process: Python's own
handlers run later, between bytecodes, so the faulting instruction would fault again forever. The handler
here runs at once: when the address lies in a guarded map it puts a page of zeros there (the instruction
then reads zeros and the run goes on) and counts the fault against the map's owner. The reader asks for
the count before it trusts what it read and stops with an error naming the file. A SIGBUS anywhere else
goes to the handler installed before this one (faulthandler's, or the default: the process dies). */
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

#define SLOTS 4096 /* maps guarded at once; beyond that a map goes unguarded (the size checks remain) */

static struct {
    _Atomic uintptr_t start, end; /* end 0: a free slot */
    _Atomic long owner;
} regions[SLOTS];
static _Atomic long fault_count, fault_owner;
static struct sigaction previous;
static int installed;
static uintptr_t page_size; /* read once at install: sysconf is not async-signal-safe */

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    uintptr_t page = address & ~(page_size - 1);
    for (int i = 0; i < SLOTS; i++) {
        if (address >= regions[i].start && address < regions[i].end) {
            if (mmap((void *)page, page_size, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1,
                     0) == MAP_FAILED)
                break;
            fault_owner = regions[i].owner;
            fault_count++;
            return;
        }
    }
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else { /* the default: returning re-runs the instruction, which faults again and ends the process */
        signal(SIGBUS, SIG_DFL);
    }
}

static int install(void) {
    struct sigaction action;
    page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0)
        return -1;
    installed = 1;
    return 0;
}

PyObject *py_guard_map(PyObject *self, PyObject *args) {
    unsigned long long start, length;
    long owner;
    if (!PyArg_ParseTuple(args, "KKl", &start, &length, &owner))
        return NULL;
    if (!installed && install() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    for (int i = 0; i < SLOTS; i++) {
        if (regions[i].end == 0) {
            regions[i].owner = owner;
            regions[i].start = (uintptr_t)start;
            regions[i].end = (uintptr_t)(start + length);
            return PyLong_FromLong(i);
        }
    }
    return PyLong_FromLong(-1);
}

PyObject *py_unguard_map(PyObject *self, PyObject *args) {
    int slot;
    if (!PyArg_ParseTuple(args, "i", &slot))
        return NULL;
    if (slot >= 0 && slot < SLOTS) {
        regions[slot].end = 0;
        regions[slot].start = 0;
    }
    Py_RETURN_NONE;
}

PyObject *py_map_faults(PyObject *self, PyObject *args) {
    return Py_BuildValue("ll", (long)fault_count, (long)fault_owner);
}
