/* The test images' one static binary: prints what a main process gets (argv, cwd, ids,
 * environment), then exits with $PROBE_EXIT, or with "serve" as first argument sleeps. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
	char cwd[512];
	int i;
	for (i = 0; i < argc; i++)
		printf("probe argv[%d]=%s\n", i, argv[i]);
	printf("probe cwd=%s\n", getcwd(cwd, sizeof cwd) ? cwd : "?");
	printf("probe uid=%d gid=%d\n", (int)getuid(), (int)getgid());
	for (i = 0; environ[i]; i++)
		printf("probe env %s\n", environ[i]);
	printf("probe end\n");
	fflush(stdout);
	if (argc > 1 && strcmp(argv[1], "serve") == 0)
		for (;;)
			pause();
	return getenv("PROBE_EXIT") ? atoi(getenv("PROBE_EXIT")) : 0;
}
