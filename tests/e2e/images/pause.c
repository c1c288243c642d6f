/* The pod sandbox's one process for the kipfix e2e real node: it holds the
 * pod's namespaces, reaps orphans, and exits on SIGINT/SIGTERM. No image can
 * be pulled in the tests, so containerd's sandbox image is built from this
 * (tests/e2e/build-node-images.sh: gcc -static, then an image FROM scratch). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) { (void)sig; _exit(0); }

static void on_child(int sig)
{
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

int main(void)
{
    struct sigaction stop = {.sa_handler = on_stop}, child = {.sa_handler = on_child};
    sigaction(SIGINT, &stop, NULL);
    sigaction(SIGTERM, &stop, NULL);
    child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &child, NULL);
    for (;;)
        pause();
}
