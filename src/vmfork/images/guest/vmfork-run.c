/* vmfork-run: start a program inside an OCI image's root, as a container runtime would.
 *
 *   vmfork-run -r ROOT [-w DIR] [-u UID] [-g GID] [-G GID,...] [-E] [-e K=V]... -- ARGV...
 *
 * chroot(ROOT), chdir(DIR), set the groups, gid and uid, then execvp ARGV with PATH as the
 * new environment says (-E starts from an empty environment; -e sets one variable). Needs
 * nothing inside the image: shell-less images (one static binary) work.
 * Exit status 127: the program was not found; 126: it could not be run; 125: setup failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void die(int code, const char *what, const char *arg)
{
	fprintf(stderr, "vmfork-run: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
	exit(code);
}

int main(int argc, char **argv)
{
	const char *root = NULL, *dir = "/";
	long uid = 0, gid = 0;
	gid_t groups[64];
	int ngroups = 0, i;

	for (i = 1; i < argc; i++) {
		const char *o = argv[i];
		if (strcmp(o, "--") == 0) {
			i++;
			break;
		}
		if (i + 1 >= argc && strcmp(o, "-E") != 0) {
			fprintf(stderr, "vmfork-run: %s needs a value\n", o);
			return 125;
		}
		if (strcmp(o, "-r") == 0) {
			root = argv[++i];
		} else if (strcmp(o, "-w") == 0) {
			dir = argv[++i];
		} else if (strcmp(o, "-u") == 0) {
			uid = strtol(argv[++i], NULL, 10);
		} else if (strcmp(o, "-g") == 0) {
			gid = strtol(argv[++i], NULL, 10);
		} else if (strcmp(o, "-G") == 0) {
			char *s = argv[++i], *tok;
			for (tok = strtok(s, ","); tok && ngroups < 64; tok = strtok(NULL, ","))
				groups[ngroups++] = (gid_t)strtol(tok, NULL, 10);
		} else if (strcmp(o, "-E") == 0) {
			clearenv();
		} else if (strcmp(o, "-e") == 0) {
			if (putenv(argv[++i]) != 0)
				die(125, "putenv", argv[i]);
		} else {
			fprintf(stderr, "vmfork-run: unknown option %s\n", o);
			return 125;
		}
	}
	if (i >= argc) {
		fprintf(stderr, "vmfork-run: no command given\n");
		return 125;
	}
	if (root && (chroot(root) != 0 || chdir("/") != 0))
		die(125, "chroot", root);
	if (chdir(dir) != 0)
		die(125, "chdir", dir);
	if (setgroups((size_t)ngroups, groups) != 0)
		die(125, "setgroups", "");
	if (setgid((gid_t)gid) != 0)
		die(125, "setgid", "");
	if (setuid((uid_t)uid) != 0)
		die(125, "setuid", "");
	execvp(argv[i], &argv[i]);
	die(errno == ENOENT ? 127 : 126, "exec", argv[i]);
	return 126;
}
