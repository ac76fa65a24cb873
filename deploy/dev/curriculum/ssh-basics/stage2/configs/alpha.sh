set -e
echo "alpha: stage 2" > motd.txt
echo "stage 2" >> history.txt
echo "configured alpha for stage 2 in $PWD"
